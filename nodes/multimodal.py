"""Images through llama.cpp's multimodal library (mtmd): a projector beside the model.

A vision model is a language model's GGUF plus a projector GGUF (``mmproj``):
mtmd decodes an image (stb_image: PNG, JPEG, BMP, GIF ...), preprocesses it as
the projector asks, encodes it into embeddings and decodes them into the
language model's context. ``Projector.tokenize`` splits a rendered prompt at
its image markers into text and image chunks; ``Projector.evaluator`` gives the
batching loop (``nodes/batching.py``) a call that evaluates one image into a
slot's sequence when its prompt reaches it.

Image positions have no token ids. In the token list that stands for such a
prompt (and in a slot's cached tokens, which new prompts are matched against to
reuse the cache) each position of an image holds one negative number derived
from the image's bytes, which no real token is: a text prompt never matches
past an image, and a chat that sends the same image again (every turn of a
conversation does) reuses the evaluated image instead of encoding it once more.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
from llama_cpp._logger import llama_log_callback

from nodes.engine import IMAGE_MARKER
from nodes.errors import InvalidRequest, ModelLoadFailed

log = logging.getLogger(__name__)


def image_position_id(image: bytes) -> int:
    """The stand-in "token" every position of ``image`` holds: negative, from its bytes."""
    return -1 - int.from_bytes(hashlib.sha256(image).digest()[:4], "big") % (2**30)


@dataclass(frozen=True, slots=True)
class Segment:
    """One chunk of a multimodal prompt: text tokens, or an image's positions."""

    tokens: tuple[int, ...]  # text ids; for an image, its stand-in id at each position
    image: int | None = None  # the chunk's index in mtmd's list, for an image; None: text


class Projector:
    """An mtmd context: the projector ``path`` bound to the loaded ``model`` (a
    ``llama_model`` pointer)."""

    def __init__(self, path: str, model: Any, *, n_threads: int, use_gpu: bool) -> None:
        # mtmd logs through its own callback: route it where llama.cpp's logs go, so a
        # quiet model (verbose=False) is quiet here too.
        mtmd.mtmd_log_set(llama_log_callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(llama_log_callback, ctypes.c_void_p(0))
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        self._marker = IMAGE_MARKER.encode()
        params.media_marker = self._marker
        self._ctx = mtmd.mtmd_init_from_file(path.encode(), model, params)
        if not self._ctx:
            raise ModelLoadFailed(
                f"llama.cpp could not load the projector {path}: it is not a projector of a "
                f"type this build supports, or it does not match the model (its output size "
                f"must be the model's embedding size)."
            )
        if not mtmd.mtmd_support_vision(self._ctx):
            self.close()
            raise ModelLoadFailed(f"The projector {path} has no vision encoder.")

    @contextmanager
    def tokenize(
        self, text: str, images: Sequence[bytes], param: str = "messages"
    ) -> Iterator[tuple[list[Segment], int]]:
        """The segments of ``text`` (``IMAGE_MARKER`` where each image goes) and mtmd's
        chunk list, valid inside the ``with``; ``InvalidRequest`` for an image llama.cpp
        cannot decode or a marker count that does not match the images."""
        if text.count(IMAGE_MARKER) != len(images):
            raise InvalidRequest(
                f"The text holds {text.count(IMAGE_MARKER)} image markers ({IMAGE_MARKER}) "
                f"for {len(images)} images; do not write the marker in the text.",
                param=param,
            )
        bitmaps = []
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            for i, image in enumerate(images):
                buf = (ctypes.c_uint8 * len(image)).from_buffer_copy(image)
                bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self._ctx, buf, len(image), False)
                if not bitmap:
                    raise InvalidRequest(
                        f"Image {i + 1} of the request is not an image llama.cpp can decode "
                        f"(send PNG, JPEG, GIF, BMP or another format stb_image reads).",
                        param=param,
                    )
                bitmaps.append(bitmap)
            data = text.encode("utf-8")
            prompt = mtmd.mtmd_input_text()
            prompt.text, prompt.text_len = data, len(data)
            prompt.add_special, prompt.parse_special = False, True  # the template wrote BOS
            array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            status = mtmd.mtmd_tokenize(
                self._ctx, chunks, ctypes.byref(prompt), array, len(bitmaps)
            )
            if status != 0:
                raise InvalidRequest(
                    f"llama.cpp could not preprocess the images (mtmd error {status}).",
                    param=param,
                )
            yield self._segments(chunks, images), chunks
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _segments(self, chunks: int, images: Sequence[bytes]) -> list[Segment]:
        segments = []
        ids = iter(image_position_id(image) for image in images)
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                segments.append(Segment(tuple(ptr[j] for j in range(n.value))))
            else:  # positions, not tokens: they differ only for M-RoPE models (Qwen-VL)
                n_pos = mtmd.mtmd_input_chunk_get_n_pos(chunk)
                segments.append(Segment((next(ids),) * n_pos, image=i))
        return segments

    def evaluator(self, chunks: Any, index: int, n_batch: int) -> Callable[[Any, int, int], None]:
        """A call that evaluates image chunk ``index`` of ``chunks`` into a llama.cpp
        context at a position, in a sequence: ``evaluate(context, position, seq_id)``."""

        def evaluate(lctx: Any, position: int, seq_id: int) -> None:
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            n_past = llama_cpp.llama_pos(0)
            status = mtmd.mtmd_helper_eval_chunk_single(
                self._ctx, lctx, chunk, position, seq_id, n_batch, False, ctypes.byref(n_past)
            )
            if status != 0:
                raise RuntimeError(f"llama.cpp failed to evaluate an image (mtmd error {status})")

        return evaluate

    def close(self) -> None:
        if self._ctx:
            mtmd.mtmd_free(self._ctx)
            self._ctx = None
