"""The real engine: GGUF models through llama.cpp's C API (llama-cpp-python's bindings).

One model, one context of ``parallel`` slots over a shared KV cache, and one
thread that decodes every running request together (``nodes/batching.py``,
scheduled by ``nodes/slots.py``). This module is the engine's face: it loads the
model and opens the context in the shape ``nodes.engine.context_shape`` gives
(which the memory estimate counts), renders chats with the model's own
template, tokenizes, and turns each request's token ids into text, thinking and
tool calls on the request's own thread. A model with a projector takes images:
``nodes/multimodal.py`` cuts the prompt at them, and the loop evaluates each
image into its slot's sequence when the prompt reaches it.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import llama_cpp
import psutil
from jinja2 import TemplateError
from llama_cpp._internals import LlamaContext, LlamaModel
from llama_cpp._logger import set_verbose
from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from nodes import cpu_kernels, rpc
from nodes.batching import Batcher, EmbedJob, End, EngineFailure, ImageSpan, Job
from nodes.chat_output.known_templates import effective_template
from nodes.chat_output.plan import (
    OutputPlan,
    check_request,
    offers_tools,
    plan_output,
    template_kwargs,
    template_messages,
)
from nodes.chat_output.reader import OutputReader
from nodes.chat_output.template import THINK_TAGS, TemplateCaps, probe
from nodes.engine import (
    ContextShape,
    Embeddings,
    EngineInfo,
    EngineSpec,
    Finished,
    FinishReason,
    GenerateRequest,
    GenerationEvent,
    Prompt,
    SamplingParams,
    StopMatcher,
    Timings,
    Usage,
    check_prompt_fits,
    context_shape,
    max_new_tokens,
)
from nodes.errors import ContextLengthExceeded, InvalidRequest, ModelLoadFailed
from nodes.gguf import check_gguf
from nodes.multimodal import Projector

log = logging.getLogger(__name__)


def default_threads() -> int:
    """Physical cores: llama.cpp gets slower, not faster, on hyper-threads."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@functools.lru_cache(maxsize=64)
def _schema_gbnf(schema_json: str) -> str:
    return json_schema_to_gbnf(schema_json)


def grammar_for(params: SamplingParams) -> str | None:
    """The GBNF grammar that constrains the output, if the request asks for JSON."""
    if params.json_schema is not None:
        try:
            return _schema_gbnf(json.dumps(params.json_schema, sort_keys=True))
        except Exception as exc:  # the converter raises bare Exceptions on bad schemas
            raise InvalidRequest(
                f"The JSON schema cannot be turned into a grammar: {exc}", param="response_format"
            ) from exc
    return JSON_GBNF if params.json_mode else None


# Markup that some vocabularies hold as special tokens, which detokenizing leaves out
# unless asked: a plan's parser must see them (llama-server's "preserved tokens").
MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<|python_tag|>")


KV_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}
FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


class LlamaCppEngine:
    """One GGUF model loaded in llama.cpp, serving ``spec.parallel`` requests at once.

    ``kernels`` says which CPU kernels llama.cpp uses for it on this box (see
    ``nodes/cpu_kernels.py``)."""

    def __init__(self, spec: EngineSpec) -> None:
        check_gguf(spec.path)
        set_verbose(False)
        self._spec = spec
        self._threads = spec.n_threads or default_threads()
        started = time.perf_counter()
        # Probed once per box (a child process), then a cache lookup: see cpu_kernels.
        self.kernels = cpu_kernels.current()
        log.info("%s: CPU kernels %s (%s)", spec.model, self.kernels.label, self.kernels.reason)
        self._model = self._load_model()
        self._projector: Projector | None = None
        self._batcher: Batcher | None = None
        self._ctx: LlamaContext | None = None
        try:
            metadata = self._model.metadata()
            arch = metadata.get("general.architecture", "")
            n_ctx_train = int(metadata.get(f"{arch}.context_length", spec.n_ctx))
            if spec.n_ctx > n_ctx_train:
                log.warning(
                    "%s: context %d exceeds the trained %d", spec.model, spec.n_ctx, n_ctx_train
                )
            pooled = f"{arch}.pooling_type" in metadata
            pooling = int(metadata.get(f"{arch}.pooling_type", llama_cpp.LLAMA_POOLING_TYPE_MEAN))
            if pooling == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                pooling = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            self.shape = context_shape(spec.n_ctx, spec.parallel, spec.llama, pooled=pooled)
            self._ctx = self._open_context(self.shape, pooling)
            if spec.projector:
                check_gguf(spec.projector)
                self._projector = Projector(
                    spec.projector,
                    self._model.model,
                    n_threads=self._threads,
                    use_gpu=spec.n_gpu_layers != 0,
                )
            # what one request may use: all cells of a unified cache, else its share
            n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx.ctx)
            self._formatter = self._chat_formatter(metadata)
            self._batcher = Batcher(
                self._model.model,
                self._ctx.ctx,
                n_ctx=llama_cpp.llama_n_ctx(self._ctx.ctx),
                n_batch=self.shape.n_batch,
                parallel=spec.parallel,
                n_swa=llama_cpp.llama_model_n_swa(self._model.model),
                # a split model's cache lies on other boxes: saving it would cross the LAN
                prompt_cache=0 if spec.rpc else spec.llama.prompt_cache_tokens(spec.n_ctx),
                name=f"engine-{spec.model}",
            )
        except BaseException:
            self.close()
            raise
        self.info = EngineInfo(
            model=spec.model,
            n_ctx=n_ctx,
            n_ctx_train=n_ctx_train,
            n_embd=llama_cpp.llama_model_n_embd(self._model.model),
            load_seconds=time.perf_counter() - started,
            parallel=spec.parallel,
        )

    def _load_model(self) -> LlamaModel:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self._spec.n_gpu_layers
        params.use_mmap = self._spec.llama.mmap
        params.use_mlock = self._spec.llama.mlock
        params.use_extra_bufts = self.kernels.extra_bufts
        if self._spec.rpc:
            self._tensor_split = self._split(params)  # read by llama.cpp during the load
        try:
            return LlamaModel(path_model=self._spec.path, params=params, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadFailed(
                f"llama.cpp could not load {self._spec.model} from {self._spec.path}: {exc}. "
                f"The file may be truncated or corrupt, or the box may lack memory."
            ) from exc

    def _split(self, params: llama_cpp.llama_model_params) -> tuple[ctypes.Array, ...]:
        """Register the boxes that hold part of the model (``spec.rpc``) and give each its
        blocks: llama.cpp offloads the last ``n_gpu_layers`` layers to the devices it is
        given, the RPC workers' then this box's GPUs, in the proportions of
        ``tensor_split``. The output layer counts as the last of them, but its weights
        stay here (``rpc.output_on_cpu``), so the logits are computed on this box. The
        arrays returned must live until the model is loaded."""
        parts = self._spec.rpc
        endpoints = [p.endpoint for p in parts]
        rpc.add_servers(endpoints, [p.node for p in parts])
        remote, local = rpc.offload_devices(endpoints)
        own = self._spec.n_gpu_layers
        if own and not local:
            raise ModelLoadFailed(
                f"{self._spec.model} was placed with {own} blocks on this box's GPUs, "
                f"and llama.cpp finds no GPU here"
            )
        shares = rpc.tensor_split(
            [p.layers for p in parts], [len(d) for d in remote], own, len(local)
        )
        devices = [d for mine in remote for d in mine] + local
        listed = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
        split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*shares)
        params.devices = ctypes.cast(listed, ctypes.c_void_p)
        params.tensor_split = split
        overrides = rpc.output_on_cpu()
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        params.n_gpu_layers = own + sum(p.layers for p in parts) + 1  # + the output layer
        log.info(
            "%s: split: %s%s",
            self._spec.model,
            ", ".join(
                f"{p.layers} layers on {p.node} ({p.endpoint}, {len(d)} device"
                f"{'s' if len(d) != 1 else ''})"
                for p, d in zip(parts, remote, strict=True)
            ),
            f", {own} layers on this box's GPUs" if own else "",
        )
        return listed, split, overrides

    def _open_context(self, shape: ContextShape, pooling: int) -> LlamaContext:
        llama = self._spec.llama
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = shape.n_ctx
        params.n_batch = shape.n_batch
        params.n_ubatch = shape.n_ubatch
        params.n_seq_max = shape.n_seq_max
        params.n_threads = params.n_threads_batch = self._threads
        params.kv_unified = llama.unified_kv
        params.swa_full = False
        params.type_k = params.type_v = KV_TYPES[llama.kv_cache_type]
        params.flash_attn_type = FLASH_ATTN[llama.flash_attn]
        params.pooling_type = pooling
        params.embeddings = False
        params.no_perf = True
        try:
            return LlamaContext(model=self._model, params=params, verbose=False)
        except ValueError as exc:
            raise ModelLoadFailed(
                f"llama.cpp could not open a context of {shape.n_ctx} tokens for "
                f"{shape.n_seq_max - 1} requests at once for {self._spec.model}: the box may "
                f"lack memory, or the settings (kv_cache_type {llama.kv_cache_type}, flash_attn "
                f"{llama.flash_attn}) do not suit this model."
            ) from exc

    def _chat_formatter(self, metadata: dict[str, str]) -> Jinja2ChatFormatter:
        model = self._model
        template = effective_template(metadata.get("tokenizer.chat_template"))
        if not template:
            log.warning("%s has no chat template; using ChatML", self._spec.model)
            template = CHATML_CHAT_TEMPLATE
        eos, bos = model.token_eos(), model.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            add_generation_prompt=True,
        )

    @functools.cached_property
    def caps(self) -> TemplateCaps:
        """What the model's chat template supports: probed once, by rendering it."""
        formatter = self._formatter

        def render(messages: list[dict], tools: list[dict] | None) -> str:
            return formatter(messages=messages, tools=tools).prompt

        return probe(formatter.template, render)

    @functools.cached_property
    def _markup_tokens(self) -> frozenset[int]:
        """The tokens that are, whole, one piece of tool-call or thinking markup."""
        found = set()
        for mark in (*MARKUP, *(tag for pair in THINK_TAGS for tag in pair)):
            tokens = self.tokenize(mark, add_bos=False, special=True)
            if len(tokens) == 1:
                found.add(tokens[0])
        return frozenset(found)

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (special tokens only when asked)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(0, n)]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.piece(t, special=special) for t in tokens).decode("utf-8", "replace")

    def _render_chat(self, request: GenerateRequest) -> str:
        """The chat's prompt by the model's own template, with tools and thinking."""
        assert request.messages is not None
        caps = self.caps
        check_request(self._spec.model, caps, request.tools, request.tool_choice, request.think)
        offered = offers_tools(request.tools, request.tool_choice)
        try:
            return self._formatter(
                messages=template_messages(request.messages, caps),
                tools=[t.as_openai() for t in request.tools] if offered else None,
                **template_kwargs(caps, request.think),
            ).prompt
        except (TemplateError, ValueError, TypeError) as exc:
            raise InvalidRequest(
                f"The model's chat template refused these messages: {exc}", param="messages"
            ) from exc

    def _check_images(self, images: tuple[bytes, ...]) -> Projector | None:
        """The projector that takes ``images``; a 400 for a model without one."""
        if images and self._projector is None:
            raise InvalidRequest(
                f"{self._spec.model} takes text only; image inputs are not supported.",
                param="messages",
            )
        return self._projector if images else None

    def _tokenize_chat(self, text: str, images: tuple[bytes, ...]) -> list[int]:
        """A rendered chat's tokens; with images, a stand-in id at each image position."""
        projector = self._check_images(images)
        if projector is None:
            return self.tokenize(text, add_bos=False, special=True)
        with projector.tokenize(text, images) as (segments, _):
            if segments and segments[-1].image is not None:
                raise InvalidRequest("A prompt must end with text, not an image.", param="messages")
            return [t for segment in segments for t in segment.tokens]

    # -- Engine protocol --------------------------------------------------------

    def encode(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            images = request.images
            self._check_images(images)  # before rendering: the cheap refusal
            text = self._render_chat(request)
            plan = plan_output(
                self.caps,
                text,
                request.tools,
                request.tool_choice,
                request.think,
                request.parallel_tool_calls,
            )
            if plan.grammar and (request.params.json_mode or request.params.json_schema):
                raise InvalidRequest(
                    "A required tool call and a JSON response format cannot both constrain "
                    "the output; send one of them.",
                    param="tool_choice",
                )
            ids = self._tokenize_chat(text, images)
            tokens: list[int] = Prompt(ids, plan, text=text if images else "", images=images)
            param = "messages"
        else:
            assert request.prompt is not None
            tokens = self.tokenize(request.prompt, add_bos=True, special=True)
            param = "prompt"
        grammar_for(request.params)  # refuse a bad schema before the request is queued
        check_prompt_fits(len(tokens), request.params.context(self.info.n_ctx), param)
        return tokens

    def generate(
        self, tokens: list[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GenerationEvent]:
        assert self._batcher is not None
        plan: OutputPlan | None = getattr(tokens, "output", None)
        gbnf = plan.grammar if plan and plan.grammar else grammar_for(params)
        job = Job(
            tokens=list(tokens),
            params=params,
            limit=max_new_tokens(len(tokens), params.context(self.info.n_ctx), params.max_tokens),
            grammar=gbnf,
            cancel=cancel,
        )
        images: tuple[bytes, ...] = getattr(tokens, "images", ())
        if images and self._projector is not None:
            job.images = self._image_spans(job, getattr(tokens, "text", ""), images)
        reader = OutputReader(plan)
        markup = self._markup_tokens if plan else frozenset()
        stops = StopMatcher(params.stop)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced = 0
        reason: FinishReason = "length"
        hit_stop_sequence = False
        batcher = self._batcher
        batcher.submit(job)
        try:
            while True:
                try:
                    item = job.out.get(timeout=1.0)
                except queue.Empty:
                    if batcher.alive:
                        continue
                    raise EngineFailure("the engine stopped while a request waited") from None
                if isinstance(item, End):
                    reason = "cancelled" if item.reason == "cancelled" else item.reason  # type: ignore[assignment]
                    break
                if isinstance(item, BaseException):
                    raise item
                if cancel.is_set():
                    reason = "cancelled"
                    break
                produced += 1
                text, stopped = stops.feed(utf8.decode(self.piece(item, special=item in markup)))
                yield from reader.feed(text)
                if stopped:
                    reason, hit_stop_sequence = "stop", True
                    break
        finally:
            job.halt = True  # the loop frees the slot at its next step
        if not hit_stop_sequence and reason != "cancelled":
            # Release what was held back: a trailing partial UTF-8 sequence and
            # text that only looked like the start of a stop sequence.
            tail, stopped = stops.feed(utf8.decode(b"", final=True))
            tail += "" if stopped else stops.flush()
            yield from reader.feed(tail)
        if reason != "cancelled":  # ... and what the parser held: a call, or plain text
            yield from reader.finish()
        ended = time.perf_counter()
        admitted = job.admitted or ended
        first = job.first or ended
        yield Finished(
            reason=reason,
            usage=Usage(prompt_tokens=len(tokens), completion_tokens=produced),
            stop_sequence=stops.matched,
            timings=Timings(
                queued=max(0.0, admitted - job.submitted),
                prompt=max(0.0, first - admitted),
                generation=max(0.0, ended - first),
            ),
        )

    def _image_spans(self, job: Job, text: str, images: tuple[bytes, ...]) -> list[ImageSpan]:
        """Where the prompt's images are, each with how the loop evaluates it; mtmd's
        chunks live as long as the job."""
        assert self._projector is not None and self._batcher is not None
        segments, chunks = job.resources.enter_context(self._projector.tokenize(text, images))
        spans, start = [], 0
        for segment in segments:
            end = start + len(segment.tokens)
            if segment.image is not None:
                evaluate = self._projector.evaluator(chunks, segment.image, self.shape.n_batch)
                spans.append(ImageSpan(start, end, evaluate))
            start = end
        return spans

    def embed(self, texts: Sequence[str]) -> Embeddings:
        assert self._batcher is not None
        # A pooled vector needs its whole input in one compute pass (llama-server refuses
        # longer inputs too); an embedding model's pass is its whole context.
        limit = min(self.info.n_ctx, self.shape.n_ubatch)
        inputs = []
        for i, text in enumerate(texts):
            ids = self.tokenize(text, add_bos=True, special=False)
            if len(ids) > self.info.n_ctx:
                raise ContextLengthExceeded(len(ids), self.info.n_ctx, param=f"input.{i}")
            if len(ids) > limit:
                raise InvalidRequest(
                    f"Input {i} has {len(ids)} tokens; {self._spec.model} embeds at most "
                    f"{limit} tokens per input (its ubatch in models.yaml). Split the text, "
                    f"or raise ubatch.",
                    param=f"input.{i}",
                )
            if not ids:
                raise InvalidRequest(f"Input {i} is empty.", param=f"input.{i}")
            inputs.append(ids)
        job = EmbedJob(inputs)
        batcher = self._batcher
        batcher.submit(job)
        while not job.done.wait(1.0):
            if not batcher.alive:
                raise EngineFailure("the engine stopped while an embedding waited")
        if job.error is not None:
            raise job.error
        assert job.vectors is not None
        return Embeddings(vectors=job.vectors, prompt_tokens=sum(map(len, inputs)))

    def check(self) -> None:
        """Raise if the engine can no longer serve (its batching loop ended)."""
        if self._batcher is None or not self._batcher.alive:
            raise EngineFailure(f"the engine of {self._spec.model} has stopped")

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        if self._projector is not None:
            self._projector.close()
            self._projector = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        self._model.close()
