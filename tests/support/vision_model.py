"""A tiny vision model for tests: the starter model plus a synthetic projector.

There is no small vision model on the package registries, so the tests build
one: a LLaVA-1.5-style projector GGUF (``clip.projector_type = "mlp"``: a
CLIP ViT, then ``mm.0`` / GELU / ``mm.2``) with random weights and tiny
dimensions, whose output size is the starter model's ``n_embd`` (576). The
keys and tensor names are those that llama.cpp's ``tools/mtmd/clip.cpp``
loads for that projector type, so mtmd loads it, preprocesses a real image
(decoded by its stb_image), encodes it into ``n_patches`` embeddings and
feeds them to the language model. The answer is nonsense; the path is real.

``png`` writes a small PNG without Pillow, so the tests send real image bytes.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import gguf
import numpy as np

VISION_MODEL = "vision:135m"  # the name the tests register it under
IMAGE_SIZE = 32  # the projector's input side, in pixels
PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # embeddings per image: 16
N_EMBD_TEXT = 576  # SmolLM2-135M's n_embd


def write_projector(
    target: Path,
    *,
    n_embd_text: int = N_EMBD_TEXT,
    n_embd: int = 32,
    n_head: int = 4,
    n_ff: int = 64,
    n_layer: int = 2,
    seed: int = 0,
) -> Path:
    """Write a LLaVA-style (``mlp``) projector GGUF with random weights to ``target``.

    Its vision tower takes ``IMAGE_SIZE`` square images in ``PATCH_SIZE`` patches and
    has ``n_layer`` blocks (LLaVA reads the features of the last but one); the MLP
    maps them to ``n_embd_text``, the language model's embedding size.
    """
    rng = np.random.default_rng(seed)

    def weights(*shape: int, scale: float = 0.05) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    writer = gguf.GGUFWriter(target, arch="clip")
    writer.add_type("projector")  # general.type, as Ollama's converter marks projectors
    writer.add_name("corral-test-projector")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.MLP])
    writer.add_vision_image_size(IMAGE_SIZE)
    writer.add_vision_patch_size(PATCH_SIZE)
    writer.add_vision_embedding_length(n_embd)
    writer.add_vision_feed_forward_length(n_ff)
    writer.add_vision_block_count(n_layer)
    writer.add_vision_head_count(n_head)
    writer.add_vision_projection_dim(n_embd_text)
    writer.add_vision_attention_layernorm_eps(1e-5)
    writer.add_vision_image_mean([0.48145466, 0.4578275, 0.40821073])
    writer.add_vision_image_std([0.26862954, 0.26130258, 0.27577711])
    writer.add_vision_use_gelu(True)

    n_pos = IMAGE_TOKENS + 1  # the patches and the class embedding
    hidden = 2 * n_embd
    # numpy shapes are ggml's ``ne`` reversed: a matmul weight is (out, in).
    tensors: dict[str, np.ndarray] = {
        "v.class_embd": weights(n_embd),
        "v.patch_embd.weight": weights(n_embd, 3, PATCH_SIZE, PATCH_SIZE),
        "v.patch_embd.bias": weights(n_embd),
        "v.position_embd.weight": weights(n_pos, n_embd),
        "v.pre_ln.weight": ones(n_embd),
        "v.pre_ln.bias": weights(n_embd),
    }
    for i in range(n_layer):
        block = f"v.blk.{i}"
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"{block}.{part}.weight"] = weights(n_embd, n_embd)
            tensors[f"{block}.{part}.bias"] = weights(n_embd)
        for norm in ("ln1", "ln2"):
            tensors[f"{block}.{norm}.weight"] = ones(n_embd)
            tensors[f"{block}.{norm}.bias"] = weights(n_embd)
        tensors[f"{block}.ffn_up.weight"] = weights(n_ff, n_embd)
        tensors[f"{block}.ffn_up.bias"] = weights(n_ff)
        tensors[f"{block}.ffn_down.weight"] = weights(n_embd, n_ff)
        tensors[f"{block}.ffn_down.bias"] = weights(n_embd)
    tensors["mm.0.weight"] = weights(hidden, n_embd)
    tensors["mm.0.bias"] = weights(hidden)
    tensors["mm.2.weight"] = weights(n_embd_text, hidden)
    tensors["mm.2.bias"] = weights(n_embd_text)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def png(width: int = 24, height: int = 24, seed: int = 0) -> bytes:
    """A ``width`` x ``height`` RGB PNG of random pixels (a real, decodable image)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
