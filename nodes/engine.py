"""The inference engine interface, the plain data it speaks, and shared helpers.

An engine owns one loaded model on one box. It is synchronous and
single-sequence (llama.cpp's context holds one conversation at a time); the
replica that wraps it (``deployments/replica.py``) serialises calls and moves
them off the event loop.

Two implementations:

* ``nodes.llamacpp.LlamaCppEngine`` runs GGUF models with llama-cpp-python;
* ``nodes.fake_engine.FakeEngine`` emits deterministic text at a set pace, for
  routing, scaling and fault tests and for benchmarks of Corral's own overhead.

``load_engine(spec)`` builds the one a spec names. Everything here is plain,
picklable data so it can cross Ray process boundaries.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from nodes.chat_output.calls import Think, Tool, ToolCall, ToolChoice
from nodes.errors import ContextLengthExceeded, InvalidRequest

if TYPE_CHECKING:
    from nodes.chat_output.plan import OutputPlan

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation: its text, and what tool turns and thinkers add.

    An assistant turn may carry the ``tool_calls`` it made and its ``thinking``; a
    ``tool`` turn is a call's result, for the call ``tool_call_id`` of ``tool_name``.
    ``images`` are the encoded image files (PNG, JPEG ...) the turn shows, in order:
    each stands where ``IMAGE_MARKER`` is in ``content``.
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    tool_name: str = ""
    thinking: str = ""
    images: tuple[bytes, ...] = ()


# Where an image of a message stands in its content (llama.cpp mtmd's default marker).
IMAGE_MARKER = "<__media__>"


def with_images(text: str, n_images: int) -> str:
    """``text`` after one ``IMAGE_MARKER`` per image, as Ollama puts a turn's images
    before its words."""
    if not n_images:
        return text
    return IMAGE_MARKER * n_images + ("\n" + text if text else "")


FLOAT32_MAX = 3.4028234663852886e38
INT32_MAX = 2**31 - 1
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. Defaults are llama.cpp's own."""

    max_tokens: int | None = None  # None: until a stop condition or the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    json_mode: bool = False  # constrain the output to a JSON value
    json_schema: dict[str, Any] | None = None  # ... or to JSON matching this schema
    # Ollama's options.num_ctx: the most tokens (prompt + reply) this request may use.
    # The replica's context is fixed when it loads, so a larger value changes nothing.
    num_ctx: int | None = None

    def __post_init__(self) -> None:
        """Refuse what no sampler can take, clamp what only means "no limit".

        llama.cpp samples with 32-bit floats and a 32-bit ``top_k``: a number beyond
        them would reach it as inf, NaN or a truncated value, so it is a 400 that
        names the field (as Ollama, decoding into float32, refuses it too).
        """
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not abs(value) <= FLOAT32_MAX:  # also NaN, inf, and ints beyond any float
                raise InvalidRequest(
                    f"{name} must be a finite number of at most {FLOAT32_MAX:.4g} in size, "
                    f"not {value}.",
                    param=name,
                )
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise InvalidRequest(
                f"seed must be a 64-bit integer (from {-(2**63)} to {2**63 - 1}).",
                param="seed",
            )
        if self.num_ctx is not None and self.num_ctx < 1:
            raise InvalidRequest(
                f"num_ctx must be at least 1 token, not {self.num_ctx}.", param="num_ctx"
            )
        if self.top_k > INT32_MAX:  # more candidates than any vocabulary: all of them
            object.__setattr__(self, "top_k", INT32_MAX)

    def context(self, n_ctx: int) -> int:
        """The context window this request may use on a replica with ``n_ctx``."""
        return n_ctx if self.num_ctx is None else max(1, min(n_ctx, self.num_ctx))


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A chat (``messages``) or a raw completion (``prompt``), with sampling settings."""

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    # Seconds the model should stay loaded after this request, Ollama's keep_alive
    # (0: unload at once; inf: never); None: the model's own setting.
    keep_alive: float | None = None
    # Functions the model may call (chats only), and whether it may, must or must not.
    # A forced call is one call unless parallel_tool_calls (llama-server's default too:
    # a small model allowed more repeats the same call until max_tokens).
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = False
    # Thinking: on, off, or a level; None: the template's default (a thinker thinks).
    think: Think | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerateRequest has exactly one of messages or prompt")

    @property
    def images(self) -> tuple[bytes, ...]:
        """Every image of the chat, in order."""
        return tuple(image for m in self.messages or () for image in m.images)


class Prompt(list[int]):
    """The tokens ``Engine.encode`` made, and how to read the output that follows them.

    It is a list of tokens like any other; ``output`` (None for a raw prompt) is the
    plan the engine made from the chat's tools and thinking, which ``generate``,
    given the same object, follows. A prompt with images keeps its rendered ``text``
    and the ``images`` for ``generate`` to evaluate; its tokens then hold a stand-in
    id (negative, never a token) at each image position, so that its length is what
    the prompt takes of the context.
    """

    __slots__ = ("output", "text", "images")

    def __init__(
        self,
        tokens: Iterable[int] = (),
        output: OutputPlan | None = None,
        text: str = "",
        images: tuple[bytes, ...] = (),
    ) -> None:
        super().__init__(tokens)
        self.output = output
        self.text = text
        self.images = images

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (list(self), self.output, self.text, self.images))


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds spent in each phase of one generation."""

    queued: float = 0.0  # waiting for the engine (set by the replica)
    prompt: float = 0.0  # prompt evaluation, up to the first sampled token
    generation: float = 0.0  # every token after the first


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text (never a partial UTF-8 sequence, never part of a stop sequence)."""

    text: str


@dataclass(frozen=True, slots=True)
class ThinkingDelta:
    """New thinking text (the model's reasoning, without its tags)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """One whole tool call the model made; ``index`` counts calls from 0 in this output."""

    index: int
    call: ToolCall


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every generation."""

    reason: FinishReason
    usage: Usage
    timings: Timings
    stop_sequence: str | None = None  # the stop sequence that ended the text, if one did


GenerationEvent = TextDelta | ThinkingDelta | ToolCallEvent | Finished


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What a loaded engine tells about itself."""

    model: str
    n_ctx: int  # the context window this replica runs with
    n_ctx_train: int  # the context the model was trained with
    n_embd: int
    load_seconds: float
    parallel: int = 1  # requests it decodes together (slots)


KvCacheType = Literal["f16", "q8_0", "q4_0"]
FlashAttn = Literal["auto", "on", "off"]
# Slots of a llama.cpp replica when models.yaml does not say: llama-server's own default,
# and on a 2-core box the most that still raises total tokens/s (bench/overhead.py).
DEFAULT_PARALLEL = 4
MAX_PARALLEL = 64


@dataclass(frozen=True, slots=True)
class LlamaSettings:
    """llama.cpp's knobs for one model (models.yaml validates them)."""

    flash_attn: FlashAttn = "auto"  # auto: llama.cpp turns it on where the backend has it
    kv_cache_type: KvCacheType = "f16"  # quantized types need flash attention
    batch: int = 2048  # tokens one llama_decode call takes at most (n_batch)
    ubatch: int = 512  # tokens per compute pass (n_ubatch): sizes the compute buffers
    mlock: bool = False  # lock the weights in RAM (never swapped out)
    mmap: bool = True  # map the file instead of reading it into memory
    # One KV cache shared by every slot (a long request may use what short ones leave),
    # or each slot its own n_ctx / parallel cells. Shared, a sequence's cells lie between
    # other sequences', and llama.cpp's CPU sums then run in another order: a greedy
    # answer may change with the load. Split, answers do not depend on what else runs.
    unified_kv: bool = True
    # Tokens of prompts kept in RAM when a new request takes their slot, to be copied
    # back when a later request shares them (nodes/prompt_cache.py). None: a quarter of
    # the context, so at most a quarter of the KV cache's memory, in RAM; 0: off.
    prompt_cache: int | None = None

    def prompt_cache_tokens(self, n_ctx: int) -> int:
        return n_ctx // 4 if self.prompt_cache is None else self.prompt_cache


@dataclass(frozen=True, slots=True)
class ContextShape:
    """The llama.cpp context a replica opens: the engine opens it so, the estimate counts it.

    One KV cache of ``n_ctx`` cells is shared by every slot (llama.cpp's ``kv_unified``):
    one request may use all of it, several share it (or, with ``unified_kv`` off, each
    slot has its share; the memory is the same). Sequence ``n_seq_max - 1`` is kept
    for embeddings, which run in the same context.
    """

    n_ctx: int
    n_seq_max: int  # the slots, plus one sequence for embeddings
    n_batch: int
    n_ubatch: int


def context_shape(n_ctx: int, parallel: int, llama: LlamaSettings, *, pooled: bool) -> ContextShape:
    """The context for ``parallel`` slots over ``n_ctx`` cells. A ``pooled`` model (one
    whose GGUF names a pooling type: an embedding model) embeds a whole input in one
    pass, so its batches are as large as its context."""
    if pooled:
        n_batch = n_ubatch = n_ctx
    else:
        n_batch = max(1, min(llama.batch, n_ctx))
        n_ubatch = max(1, min(llama.ubatch, n_batch))
    return ContextShape(n_ctx=n_ctx, n_seq_max=parallel + 1, n_batch=n_batch, n_ubatch=n_ubatch)


@dataclass(frozen=True, slots=True)
class RpcPart:
    """Layers of a split model that another box holds and computes, through its RPC
    worker (``nodes/rpc.py``)."""

    node: str  # the box, for messages
    endpoint: str  # its RPC worker, HOST:PORT on the cluster's network
    layers: int  # how many of the model's blocks it holds (the output layer stays home)


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Everything needed to start an engine for one model on one box."""

    model: str  # the name clients use, e.g. "smollm2:135m"
    path: str  # the GGUF file ("" for the fake engine)
    n_ctx: int = 4096
    n_threads: int | None = None  # None: the box's physical cores
    n_gpu_layers: int = 0
    engine: Literal["llama.cpp", "fake"] = "llama.cpp"
    options: dict[str, Any] = field(default_factory=dict)  # the fake engine's settings
    # Requests the replica decodes together (llama.cpp slots); more wait in its queue.
    parallel: int = 1
    llama: LlamaSettings = field(default_factory=LlamaSettings)
    # Where a node without ``path`` gets the file (``nodes/locate.py``): the blob's
    # digest ("sha256:<hex>") and the head's API ("http://10.0.0.2:11434"); "" for none.
    digest: str = ""
    fetch_from: str = ""
    # The projector GGUF (mmproj) of a vision model, and its blob's digest (fetched like
    # the model's); "" for a text-only model.
    projector: str = ""
    projector_digest: str = ""
    # A split model: the layers other boxes hold, after this box's own (its CPU, and its
    # GPUs' ``n_gpu_layers``); empty for a model this box holds whole.
    rpc: tuple[RpcPart, ...] = ()


class Engine(Protocol):
    """A loaded model that can tokenize, generate and embed, one call at a time."""

    info: EngineInfo

    def encode(self, request: GenerateRequest) -> list[int]:
        """Render the prompt (chat template for messages) and tokenize it.

        Raises ``InvalidRequest`` for input the model cannot take (tools or thinking
        its template lacks among them) and ``ContextLengthExceeded`` when no token
        would fit after the prompt. A chat's tokens come as a ``Prompt`` whose plan
        ``generate`` follows.
        """
        ...

    def generate(
        self, tokens: list[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GenerationEvent]:
        """Yield text, thinking and tool calls as they are produced, then exactly one
        ``Finished``.

        Stops early with reason ``cancelled`` once ``cancel`` is set.
        """
        ...

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """One L2-normalised vector per text."""
        ...

    def close(self) -> None:
        """Free the model's memory."""
        ...


def load_engine(spec: EngineSpec) -> Engine:
    """Build and load the engine ``spec`` names (imports llama.cpp only when needed)."""
    if spec.engine == "fake":
        from nodes.fake_engine import FakeEngine

        return FakeEngine(spec)
    from nodes.llamacpp import LlamaCppEngine

    return LlamaCppEngine(spec)


def check_prompt_fits(n_prompt: int, n_ctx: int, param: str) -> None:
    """Refuse a prompt that leaves no room for even one generated token."""
    if n_prompt == 0:
        raise InvalidRequest("The prompt is empty.", param=param)
    if n_prompt >= n_ctx:
        raise ContextLengthExceeded(n_prompt, n_ctx, param=param)


def max_new_tokens(n_prompt: int, n_ctx: int, requested: int | None) -> int:
    """How many tokens may be generated: what was asked, capped by the context left."""
    room = n_ctx - n_prompt
    return room if requested is None else max(0, min(room, requested))


class StopMatcher:
    """Hold back text that might be the start of a stop sequence.

    ``feed`` returns the text that is safe to emit and whether a stop sequence
    was found (everything from the stop sequence on is dropped). ``flush``
    returns what was held back once generation ends for another reason.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None  # the stop sequence found, once one is

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._held + text
        found = [(i, s) for s in self._stops if (i := buf.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self._held = ""
            return buf[:cut], True
        keep = max((_overlap(buf, s) for s in self._stops), default=0)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
