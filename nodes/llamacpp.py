"""The real engine: GGUF models through llama-cpp-python.

We drive ``Llama.generate`` (llama-cpp-python's token loop: prefix-cache reuse,
the sampler chain) rather than ``create_completion``, because we need what the
latter hides: exact token counts in streams, the time to the first token, a
cancel check between tokens, and one event type shared with the fake engine.
A model with a projector takes images: ``nodes/multimodal.py`` evaluates them
into the context before ``Llama.generate`` goes on from the last token.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence

import llama_cpp
import psutil
from jinja2 import TemplateError
from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

from nodes import cpu_kernels
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


class LlamaCppEngine:
    """One GGUF model loaded in llama.cpp, used one call at a time.

    ``kernels`` says which CPU kernels llama.cpp uses for it on this box (see
    ``nodes/cpu_kernels.py``)."""

    def __init__(self, spec: EngineSpec) -> None:
        check_gguf(spec.path)
        self._spec = spec
        self._threads = spec.n_threads or default_threads()
        started = time.perf_counter()
        # Probed once per box (a child process), then a cache lookup: see cpu_kernels.
        self.kernels = cpu_kernels.current()
        log.info("%s: CPU kernels %s (%s)", spec.model, self.kernels.label, self.kernels.reason)
        self._llm = self._load(embedding=False, n_ctx=spec.n_ctx)
        self._embedder: llama_cpp.Llama | None = None
        self._projector: Projector | None = None
        if spec.projector:
            try:
                check_gguf(spec.projector)
                self._projector = Projector(
                    spec.projector,
                    self._llm,
                    n_threads=self._threads,
                    use_gpu=spec.n_gpu_layers != 0,
                )
            except ModelLoadFailed:
                self._llm.close()
                raise
        metadata = self._llm.metadata
        arch = metadata.get("general.architecture", "")
        n_ctx_train = int(metadata.get(f"{arch}.context_length", self._llm.n_ctx()))
        if spec.n_ctx > n_ctx_train:
            log.warning(
                "%s: context %d exceeds the trained %d", spec.model, spec.n_ctx, n_ctx_train
            )
        self._pooling = int(metadata.get(f"{arch}.pooling_type", llama_cpp.LLAMA_POOLING_TYPE_MEAN))
        if self._pooling == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            self._pooling = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self._formatter = self._chat_formatter()
        self.info = EngineInfo(
            model=spec.model,
            n_ctx=self._llm.n_ctx(),
            n_ctx_train=n_ctx_train,
            n_embd=self._llm.n_embd(),
            load_seconds=time.perf_counter() - started,
        )

    def _load(self, *, embedding: bool, n_ctx: int) -> llama_cpp.Llama:
        kwargs = {}
        if embedding:
            # Embeddings take one whole input per batch; a separate context keeps
            # the chat context (and its prompt cache) fast. Weights are mmapped, so
            # the two contexts share them in the page cache.
            kwargs = {"n_batch": n_ctx, "n_ubatch": n_ctx, "pooling_type": self._pooling}
        try:
            with cpu_kernels.extra_bufts(self.kernels.extra_bufts):
                return llama_cpp.Llama(
                    self._spec.path,
                    n_ctx=n_ctx,
                    n_threads=self._threads,
                    n_threads_batch=self._threads,
                    n_gpu_layers=self._spec.n_gpu_layers,
                    embedding=embedding,
                    verbose=False,
                    **kwargs,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadFailed(
                f"llama.cpp could not load {self._spec.model} from {self._spec.path}: {exc}. "
                f"The file may be truncated or corrupt, or the box may lack memory."
            ) from exc

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        llm = self._llm
        template = effective_template(llm.metadata.get("tokenizer.chat_template"))
        if not template:
            log.warning("%s has no chat template; using ChatML", self._spec.model)
            template = CHATML_CHAT_TEMPLATE
        eos, bos = llm.token_eos(), llm.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
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
            tokens = self._llm.tokenize(mark.encode("utf-8"), add_bos=False, special=True)
            if len(tokens) == 1:
                found.add(tokens[0])
        return frozenset(found)

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
            return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        with projector.tokenize(text, images) as (segments, _):
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
            tokens = self._llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True)
            param = "prompt"
        grammar_for(request.params)  # refuse a bad schema before the request is queued
        check_prompt_fits(len(tokens), request.params.context(self.info.n_ctx), param)
        return tokens

    def generate(
        self, tokens: list[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GenerationEvent]:
        llm = self._llm
        limit = max_new_tokens(len(tokens), params.context(self.info.n_ctx), params.max_tokens)
        llm.set_seed(params.seed if params.seed is not None else secrets.randbits(32))
        plan: OutputPlan | None = getattr(tokens, "output", None)
        gbnf = plan.grammar if plan and plan.grammar else grammar_for(params)
        reader = OutputReader(plan)
        markup = self._markup_tokens if plan else frozenset()
        stops = StopMatcher(params.stop)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        started = time.perf_counter()
        first_at: float | None = None
        produced = 0
        reason: FinishReason = "length"
        hit_stop_sequence = False
        images: tuple[bytes, ...] = getattr(tokens, "images", ())
        if images and self._projector is not None:
            # Text and images but the last token go into the context here (the images
            # through the projector); Llama.generate finds them cached and goes on.
            text: str = getattr(tokens, "text", "")
            with self._projector.tokenize(text, images) as (segments, chunks):
                tokens = self._projector.prefill(segments, chunks, llm.n_batch)
        stream = llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            grammar=LlamaGrammar.from_string(gbnf, verbose=False) if gbnf else None,
        )
        try:
            for token in stream if limit > 0 else ():
                first_at = first_at or time.perf_counter()
                if cancel.is_set():
                    reason = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = "stop"
                    break
                produced += 1
                piece = llm.detokenize([token], special=token in markup)
                text, stopped = stops.feed(utf8.decode(piece))
                yield from reader.feed(text)
                if stopped:
                    reason, hit_stop_sequence = "stop", True
                    break
                if produced >= limit:
                    break
        finally:
            stream.close()
        if not hit_stop_sequence and reason != "cancelled":
            # Release what was held back: a trailing partial UTF-8 sequence and
            # text that only looked like the start of a stop sequence.
            tail, stopped = stops.feed(utf8.decode(b"", final=True))
            tail += "" if stopped else stops.flush()
            yield from reader.feed(tail)
        if reason != "cancelled":  # ... and what the parser held: a call, or plain text
            yield from reader.finish()
        ended = time.perf_counter()
        first_at = first_at or ended
        yield Finished(
            reason=reason,
            usage=Usage(prompt_tokens=len(tokens), completion_tokens=produced),
            timings=Timings(prompt=first_at - started, generation=ended - first_at),
        )

    def embed(self, texts: Sequence[str]) -> Embeddings:
        if self._embedder is None:
            self._embedder = self._load(embedding=True, n_ctx=self.info.n_ctx)
        n_tokens = 0
        for i, text in enumerate(texts):
            n = len(self._embedder.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if n > self.info.n_ctx:
                raise ContextLengthExceeded(n, self.info.n_ctx, param=f"input.{i}")
            n_tokens += n
        vectors = self._embedder.embed(list(texts), normalize=True, truncate=False)
        return Embeddings(vectors=[list(map(float, v)) for v in vectors], prompt_tokens=n_tokens)

    def close(self) -> None:
        if self._projector is not None:
            self._projector.close()
            self._projector = None
        for llm in (self._llm, self._embedder):
            if llm is not None:
                llm.close()
        self._embedder = None
