"""Ollama's API behaviour, free of HTTP: requests in, objects or NDJSON lines out.

``OllamaServing`` turns Ollama requests into engine requests, calls the
``ModelBackend``, and turns engine events back into Ollama's objects. It
mirrors ``deployments/openai/serving.py``: streams are opened (the replica has
admitted the request) before the HTTP response starts, so an error found up
front (unknown model, prompt too long) is an ordinary HTTP error; an error
after the first line is one final ``{"error": ...}`` line, after which the
stream ends.

Sampling follows Ollama's layering: Ollama's defaults, overlaid by the model's
manifest ``parameters``, overlaid by the request's ``options``. The manifest
comes from ``backend.list_models()``, kept for ``MODELS_TTL`` seconds so that a
request does not cost a controller call.

Durations are nanoseconds, as Ollama reports them: ``load_duration`` is the
time until the replica admitted the request (a cold start included),
``prompt_eval_duration`` and ``eval_duration`` are the engine's own timings,
and ``total_duration`` the whole request as the API saw it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from pydantic import BaseModel

from deployments.backend import ModelBackend
from deployments.errors import classify
from deployments.generation import Generation, Result, answer, embed
from deployments.images import image_from_base64
from deployments.ollama import protocol as p
from deployments.protocol_base import log_ignored, refuse_empty_texts, refuse_unsupported
from deployments.replica import StreamEvent
from deployments.views import PlacementView
from nodes.chat_output.calls import (
    history_calls,
    parse_think,
    parse_tool_choice,
    parse_tools,
)
from nodes.chat_output.known_templates import effective_template
from nodes.chat_output.template import template_caps
from nodes.engine import (
    FLOAT32_MAX,
    ChatMessage,
    Finished,
    GenerateRequest,
    SamplingParams,
    TextDelta,
    ThinkingDelta,
    ToolCallEvent,
    with_images,
)
from nodes.errors import InvalidRequest, ModelNotFound
from nodes.models import LocalModel, ModelDetails, model_name

log = logging.getLogger("corral.ollama")

# The Ollama release whose API Corral speaks: the first with every field Corral
# reads or writes (/api/embed's ``dimensions`` came last, in 0.11.11). Clients
# such as editors' Ollama integrations check this to enable features.
OLLAMA_VERSION = "0.11.11"

MODELS_TTL = 2.0  # seconds a listing of the library serves model lookups

# Ollama's defaults (api/types.go DefaultOptions) for what the engine samples with.
OLLAMA_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_penalty": 1.1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
# The options Corral honours per request, by the JSON type Ollama gives them.
_INTEGER, _NUMBER, _STRINGS = "an integer", "a number", "a list of strings"
_OPTIONS: dict[str, str] = {
    "num_ctx": _INTEGER,
    "num_predict": _INTEGER,
    "seed": _INTEGER,
    "top_k": _INTEGER,
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "min_p": _NUMBER,
    "repeat_penalty": _NUMBER,
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "stop": _STRINGS,
}

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_GO_MAX_DURATION = 2**63 - 1  # ns: how far in the future Ollama's "forever" lies
_PARAMETER_COLUMN = 30  # width of the name column in /api/show's parameters


# A function building one stream object: (model, text, done, done_reason, thinking,
# tool calls) -> chunk.
_Piece = Callable[[str, str, bool, str | None, str | None, Sequence[ToolCallEvent]], BaseModel]


class OllamaServing:
    """Ollama's native API over a ``ModelBackend`` (see module docstring)."""

    def __init__(self, backend: ModelBackend) -> None:
        self._backend = backend
        self._listing: tuple[float, dict[str, LocalModel]] | None = None

    # -- chat and generate ------------------------------------------------------------

    async def chat(self, req: p.ChatRequest) -> dict[str, Any] | AsyncIterator[str]:
        return await self._run(
            req, bool(req.messages), lambda m: chat_to_engine(req, m), _chat_piece
        )

    async def generate(self, req: p.GenerateRequest) -> dict[str, Any] | AsyncIterator[str]:
        return await self._run(
            req, bool(req.prompt), lambda m: generate_to_engine(req, m), _generate_piece
        )

    async def _run(
        self,
        req: p.GenerationFields,
        asked: bool,
        to_engine: Callable[[LocalModel], GenerateRequest],
        piece: _Piece,
    ) -> dict[str, Any] | AsyncIterator[str]:
        """A chat or a generate: ``asked`` is whether it has a prompt (without one it
        loads or unloads the model); ``to_engine`` makes its engine request."""
        started = time.perf_counter()
        name = model_name(req.model)
        model = await self._find(req.model, name)
        if not asked:
            reason = await self._load_or_unload(name, req.keep_alive)
            return piece(req.model, "", True, reason, None, ()).model_dump(exclude_none=True)
        result = await answer(self._backend, name, to_engine(model), stream=req.stream)
        if not isinstance(result, Result):
            return self._stream(result, req.model, piece, started)
        calls = [ToolCallEvent(i, call) for i, call in enumerate(result.tool_calls)]
        last = piece(req.model, result.text, True, result.finished.reason, result.thinking, calls)
        return _final(last, result.finished, started, result.admitted)

    async def _load_or_unload(self, name: str, keep_alive: float | None) -> str:
        """An empty prompt: Ollama's way to load a model, or with keep_alive 0 to unload it."""
        if keep_alive == 0:
            await self._backend.unload_model(name)
            return "unload"
        await self._backend.load_model(name, keep_alive)
        return "load"

    async def _stream(
        self, gen: Generation, model: str, piece: _Piece, started: float
    ) -> AsyncIterator[str]:
        try:
            async for batch in gen:  # one write per batch: a message, not one per token
                lines = [
                    ndjson(obj.model_dump(exclude_none=True))
                    for obj in _pieces(batch, model, piece)
                ]
                for event in batch:
                    if isinstance(event, Finished):
                        last = piece(model, "", True, event.reason, None, ())
                        lines.append(ndjson(_final(last, event, started, gen.admitted)))
                if lines:
                    yield "".join(lines)
        except Exception as exc:  # noqa: BLE001 - reported to the client, then the stream ends
            log.warning("stream failed: %s", exc)
            yield ndjson_error(exc)
        finally:
            await gen.aclose()

    # -- embeddings ---------------------------------------------------------------------

    async def embed(self, req: p.EmbedRequest) -> p.EmbedResponse:
        started = time.perf_counter()
        log_ignored(log, req, req.options)  # embeddings sample nothing
        name = model_name(req.model)
        texts = embed_inputs(req)
        if not texts:  # Ollama loads the model and answers no vectors
            await self._backend.load_model(name, req.keep_alive)
            vectors, tokens = [], 0
        else:
            result = await embed(self._backend, name, texts, req.keep_alive)
            vectors = [shorten(v, req.dimensions) for v in result.vectors]
            tokens = result.prompt_tokens
        return p.EmbedResponse(
            model=req.model,
            embeddings=vectors,
            total_duration=_ns(time.perf_counter() - started),
            # The backend embeds in one call: a cold start counts in total_duration only.
            load_duration=0,
            prompt_eval_count=tokens,
        )

    async def embeddings(self, req: p.EmbeddingsRequest) -> p.EmbeddingsResponse:
        log_ignored(log, req, req.options)
        name = model_name(req.model)
        if not req.prompt:
            await self._backend.load_model(name, req.keep_alive)
            return p.EmbeddingsResponse(embedding=[])
        result = await embed(self._backend, name, [req.prompt], req.keep_alive)
        return p.EmbeddingsResponse(embedding=result.vectors[0])

    # -- the library --------------------------------------------------------------------

    async def tags(self) -> p.TagsResponse:
        models = await self._models(fresh=True)
        return p.TagsResponse(models=[_listed(m) for m in models.values()])

    async def ps(self) -> p.PsResponse:
        rows = await self._backend.cluster_placements()
        models = await self._models()
        return p.PsResponse(models=running_models(rows, models, time.time_ns()))

    async def show(self, req: p.ShowRequest) -> p.ShowResponse:
        log_ignored(log, req)
        if req.verbose:
            log.info("ignoring verbose: the backend gives no long arrays of the GGUF header")
        model, metadata = await self._backend.show_model(model_name(req.model))
        return show_response(model, metadata)

    async def pull(self, req: p.PullRequest) -> dict[str, Any] | AsyncIterator[str]:
        log_ignored(log, req)
        # No name check here: a pull also takes hf.co/..., URLs and GGUF paths; the
        # backend refuses a bad one before its first progress object.
        return await self._progress(self._backend.pull(req.model.strip(), req.insecure), req.stream)

    async def create(self, req: p.CreateRequest) -> dict[str, Any] | AsyncIterator[str]:
        log_ignored(log, req)
        name = model_name(req.model)
        recipe = create_recipe(req)
        return await self._progress(self._backend.create_model(name, recipe), req.stream)

    async def delete(self, req: p.ModelRequest) -> None:
        log_ignored(log, req)
        await self._backend.delete_model(model_name(req.model))
        self._listing = None

    async def copy(self, req: p.CopyRequest) -> None:
        log_ignored(log, req)
        source = model_name(req.source, "source")
        await self._backend.copy_model(source, model_name(req.destination, "destination"))
        self._listing = None

    def version(self) -> p.VersionResponse:
        return p.VersionResponse(version=OLLAMA_VERSION)

    # -- blobs (uploads for /api/create; model files for other nodes) -------------------

    async def blob_file(self, digest: str) -> str | None:
        return await self._backend.blob_file(check_digest(digest))

    async def save_blob(self, digest: str, chunks: AsyncIterator[bytes]) -> None:
        await self._backend.save_blob(check_digest(digest), chunks)

    # -- plumbing -----------------------------------------------------------------------

    async def _models(self, *, fresh: bool = False) -> dict[str, LocalModel]:
        """The library by name, listed at most ``MODELS_TTL`` seconds ago unless ``fresh``."""
        now = time.monotonic()
        if fresh or self._listing is None or now - self._listing[0] > MODELS_TTL:
            models = await self._backend.list_models()
            self._listing = (now, {m.name: m for m in models})
        return self._listing[1]

    async def _find(self, given: str, name: str) -> LocalModel:
        """The model ``name``; a listing that lacks it is refreshed once (a fresh pull)."""
        model = (await self._models()).get(name) or (await self._models(fresh=True)).get(name)
        if model is None:
            raise ModelNotFound(given.strip())
        return model

    async def _progress(
        self, progress: AsyncIterator[dict[str, Any]], stream: bool
    ) -> dict[str, Any] | AsyncIterator[str]:
        """Pull or create progress: NDJSON, or just the last object when not streamed.

        The first object is awaited here, so that a bad name or an unknown model
        is an HTTP error rather than a line in a stream.
        """
        try:
            first = await anext(progress)
        except BaseException:
            await progress.aclose()
            raise
        if stream:
            return self._stream_progress(first, progress)
        last = first
        try:
            async for item in progress:
                last = item
        finally:
            await progress.aclose()
            self._listing = None
        return last

    async def _stream_progress(
        self, first: dict[str, Any], progress: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[str]:
        try:
            yield ndjson(first)
            async for item in progress:
                yield ndjson(item)
        except Exception as exc:  # noqa: BLE001 - reported to the client, then the stream ends
            log.warning("%s failed: %s", first.get("status", "progress"), exc)
            yield ndjson_error(exc)
        finally:
            await progress.aclose()
            self._listing = None


# -- request conversion (pure) --------------------------------------------------------


def check_digest(digest: str) -> str:
    """A blob digest as Ollama writes it in URLs: ``sha256:<64 hex>``."""
    if not _DIGEST.match(digest):
        raise InvalidRequest(
            f"{digest!r} is not a blob digest: write sha256: and 64 lowercase hex digits.",
            param="digest",
        )
    return digest


def chat_to_engine(req: p.ChatRequest, model: LocalModel) -> GenerateRequest:
    """An Ollama chat as an engine request; the model's system prompt unless one is given."""
    log_ignored(log, req, req.options, _OPTIONS.keys())
    refuse_unsupported(req, "logprobs")
    tools = parse_tools(req.tools)
    tool_choice = parse_tool_choice(req.tool_choice, tools)
    messages = chat_messages(req.messages, model)
    if model.system and not any(m.role == "system" for m in messages):
        messages = (ChatMessage("system", model.system), *messages)
    params = sampling_params(req.options, model.parameters, req.format)
    return GenerateRequest(
        messages=messages,
        params=params,
        keep_alive=req.keep_alive,
        tools=tools,
        tool_choice=tool_choice,
        think=parse_think(req.think),
    )


def generate_to_engine(req: p.GenerateRequest, model: LocalModel) -> GenerateRequest:
    """An Ollama generate as an engine request: the prompt is the user's turn of a chat
    (after ``system``, else the model's system prompt), or the whole prompt when ``raw``."""
    log_ignored(log, req, req.options, _OPTIONS.keys())
    refuse_unsupported(req, "logprobs")
    images = _images(req.images, "images", model)
    if images and req.raw:
        raise InvalidRequest(
            "Images need the model's chat template to place them: send them without raw: true.",
            param="raw",
        )
    refuse_unsupported(req, "suffix")
    if req.template:
        raise InvalidRequest(
            "A per-request template is not supported: Corral prompts with the model's own "
            "chat template. Format the prompt yourself and send raw: true instead.",
            param="template",
        )
    if req.context:
        raise InvalidRequest(
            "context (the deprecated token memory of /api/generate) is not supported; send "
            "the conversation as messages to /api/chat instead.",
            param="context",
        )
    params = sampling_params(req.options, model.parameters, req.format)
    if req.raw:
        return GenerateRequest(prompt=req.prompt, params=params, keep_alive=req.keep_alive)
    system = req.system or model.system
    turns = (ChatMessage("system", system),) if system else ()
    user = ChatMessage("user", with_images(req.prompt, len(images)), images=images)
    messages = (*turns, user)
    return GenerateRequest(
        messages=messages, params=params, keep_alive=req.keep_alive, think=parse_think(req.think)
    )


def sampling_params(
    options: Mapping[str, Any] | None, parameters: Mapping[str, Any], fmt: Any = None
) -> SamplingParams:
    """Ollama's defaults, overlaid by the model's ``parameters``, overlaid by ``options``.

    Options Corral cannot set per request (num_gpu, num_thread, mirostat, ...)
    are ignored, as Ollama ignores options it does not know; a wrong type is a 400.
    """
    merged = {**OLLAMA_DEFAULTS, **parameters, **(options or {})}
    values = {k: _option(k, v) for k, v in merged.items() if k in _OPTIONS and v is not None}
    num_predict = values.pop("num_predict", None)
    if values.get("seed", 0) < 0:  # Ollama's -1: a random seed
        del values["seed"]
    json_mode, json_schema = output_format(fmt)
    try:
        return SamplingParams(
            # -1 (no limit) and -2 (fill the context) both run to the context's end
            max_tokens=None if num_predict is None or num_predict < 0 else num_predict,
            stop=tuple(values.pop("stop", ())),
            json_mode=json_mode,
            json_schema=json_schema,
            **values,
        )
    except InvalidRequest as exc:  # a value no sampler takes: name it as the client sent it
        rest = exc.message.removeprefix(str(exc.param))
        raise InvalidRequest(f"option {exc.param!r}{rest}", param=f"options.{exc.param}") from None


def output_format(fmt: Any) -> tuple[bool, dict[str, Any] | None]:
    """Ollama's ``format``: "json" (any JSON value) or a JSON schema object."""
    if fmt is None or fmt == "":
        return False, None
    if fmt == "json":
        return True, None
    if isinstance(fmt, dict):
        return False, fmt
    raise InvalidRequest(
        f'format must be "json" or a JSON schema object, not {json.dumps(fmt)}.', param="format"
    )


def embed_inputs(req: p.EmbedRequest) -> list[str]:
    """The texts to embed: none for an empty input (a load), refusing empty list items."""
    if isinstance(req.input, str):
        return [req.input] if req.input else []
    refuse_empty_texts(req.input)
    return req.input


def shorten(vector: list[float], dimensions: int | None) -> list[float]:
    """Ollama's ``dimensions``: the first ``dimensions`` values, normalised again."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


def create_recipe(req: p.CreateRequest) -> dict[str, Any]:
    """What ``backend.create_model`` takes from an /api/create request, checked."""
    if req.modelfile:
        raise InvalidRequest(
            "Corral takes /api/create as Ollama 0.5 and later send it (from, files, template, "
            "system, parameters, license), not a modelfile; update the client.",
            param="modelfile",
        )
    refused = {
        "quantize": "Quantizing is not supported: pull or upload a quantized GGUF.",
        "adapters": "LoRA adapters are not supported.",
        "messages": "Models with stored messages are not supported.",
    }
    for field, message in refused.items():
        if getattr(req, field):
            raise InvalidRequest(message, param=field)
    if req.parameters:
        sampling_params(req.parameters, {})  # a wrong type would break every request later
    recipe = {
        "from": req.from_,
        "files": req.files,
        "template": req.template,
        "system": req.system,
        "parameters": req.parameters,
        "license": req.license,
    }
    return {k: v for k, v in recipe.items() if v}


def chat_messages(
    messages: list[p.Message], model: LocalModel | None = None
) -> tuple[ChatMessage, ...]:
    """Ollama's messages as the engine's. A tool result names its tool (``tool_name``) or
    the call it answers (``tool_call_id``, as Open WebUI sends it): each gets the other
    from the calls before it, as templates use one or the other. A turn's images go
    before its words, as Ollama places them; ``model`` must take images if any come."""
    names: dict[str, str] = {}
    ids: dict[str, str] = {}
    out = []
    for i, msg in enumerate(messages):
        message = _chat_message(i, msg, model)
        for call in message.tool_calls:
            names[call.id] = call.name
            ids[call.name] = call.id
        if message.role == "tool":
            call_id = message.tool_call_id or ids.get(message.tool_name, "")
            name = message.tool_name or names.get(message.tool_call_id, "")
            message = replace(message, tool_call_id=call_id, tool_name=name)
        out.append(message)
    return tuple(out)


def _images(data: list[str] | None, param: str, model: LocalModel | None) -> tuple[bytes, ...]:
    """Ollama's base64 images, decoded; a 400 for a model without a projector."""
    if not data:
        return ()
    if model is not None and not model.projector:
        raise InvalidRequest(
            f"{model.name} takes text only; image inputs are not supported.", param=param
        )
    return tuple(image_from_base64(image, f"{param}.{i}") for i, image in enumerate(data))


def _chat_message(index: int, msg: p.Message, model: LocalModel | None = None) -> ChatMessage:
    images = _images(msg.images, f"messages.{index}.images", model)
    calls = history_calls(msg.tool_calls, index)
    tool = msg.role == "tool"
    return ChatMessage(
        role=msg.role,
        content=with_images(msg.content, len(images)),
        images=images,
        tool_calls=calls,
        tool_call_id=(msg.tool_call_id or "") if tool else "",
        tool_name=(msg.tool_name or "") if tool else "",
        thinking=msg.thinking or "",
    )


def _option(key: str, value: Any) -> Any:
    """An option's value, typed as Ollama types it (a JSON number may be 3 or 3.0)."""
    kind = _OPTIONS[key]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    # (isfinite would take an int beyond any float, 10**400, as an overflow)
    if kind == _INTEGER and number and (isinstance(value, int) or math.isfinite(value)):
        return int(value)
    if kind == _NUMBER and number:
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float (10**400)
            raise InvalidRequest(
                f"option {key!r} must be a number of at most {FLOAT32_MAX:.4g} in size.",
                param=f"options.{key}",
            ) from None
    if kind == _STRINGS and isinstance(value, str):
        return [value]
    if kind == _STRINGS and isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise InvalidRequest(f"option {key!r} must be {kind}.", param=f"options.{key}")


# -- response building ------------------------------------------------------------------


def _chat_piece(
    model: str,
    text: str,
    done: bool,
    reason: str | None,
    thinking: str | None = None,
    calls: Sequence[ToolCallEvent] = (),
) -> p.ChatChunk:
    message = p.AssistantMessage(
        content=text,
        thinking=thinking or None,
        tool_calls=[_tool_call_out(e) for e in calls] or None,
    )
    return p.ChatChunk(
        model=model,
        created_at=rfc3339(time.time_ns()),
        message=message,
        done=done,
        done_reason=reason,
    )


def _generate_piece(
    model: str,
    text: str,
    done: bool,
    reason: str | None,
    thinking: str | None = None,
    calls: Sequence[ToolCallEvent] = (),  # (no tools on generate)
) -> p.GenerateChunk:
    return p.GenerateChunk(
        model=model,
        created_at=rfc3339(time.time_ns()),
        response=text,
        thinking=thinking or None,
        done=done,
        done_reason=reason,
    )


def _tool_call_out(event: ToolCallEvent) -> p.ToolCallOut:
    call = event.call
    function = p.ToolCallFunctionOut(index=event.index, name=call.name, arguments=call.arguments)
    return p.ToolCallOut(id=call.id, function=function)


def _pieces(batch: list[StreamEvent], model: str, piece: _Piece) -> list[BaseModel]:
    """A batch's stream objects, as Ollama streams them: each run of answer or thinking
    text as one object, each tool call as one object of its own."""
    out: list[BaseModel] = []
    text: list[str] = []
    thought: list[str] = []

    def flush() -> None:
        if text:
            out.append(piece(model, "".join(text), False, None, None, []))
        if thought:
            out.append(piece(model, "", False, None, "".join(thought), []))
        text.clear()
        thought.clear()

    for event in batch:
        if isinstance(event, TextDelta):
            if thought:
                flush()
            text.append(event.text)
        elif isinstance(event, ThinkingDelta):
            if text:
                flush()
            thought.append(event.text)
        elif isinstance(event, ToolCallEvent):
            flush()
            out.append(piece(model, "", False, None, None, [event]))
    flush()
    return out


def _final(last: BaseModel, finished: Finished, started: float, admitted: float) -> dict[str, Any]:
    """The ``done`` object: the last piece with the generation's counts and durations
    (``started``: when the request arrived; ``admitted``: when the replica took it)."""
    metrics = metrics_of(finished, started, admitted, time.perf_counter())
    return {**last.model_dump(exclude_none=True), **metrics.model_dump()}


def metrics_of(finished: Finished, started: float, admitted: float, ended: float) -> p.Metrics:
    """Ollama's counts and nanosecond durations of one generation.

    The engine's phases happen between admission and the end, so the whole
    request is at least their sum; the ``max`` keeps that true when the engine
    ran in another process whose clock ticks apart from ours.
    """
    t, usage = finished.timings, finished.usage
    load, queued = _ns(admitted - started), _ns(t.queued)
    prompt, generation = _ns(t.prompt), _ns(t.generation)
    return p.Metrics(
        total_duration=max(_ns(ended - started), load + queued + prompt + generation),
        load_duration=load,
        prompt_eval_count=usage.prompt_tokens,
        prompt_eval_duration=prompt,
        eval_count=usage.completion_tokens,
        eval_duration=generation,
    )


def details(d: ModelDetails) -> p.Details:
    return p.Details(
        parent_model=d.parent_model,
        format=d.format,
        family=d.family,
        families=list(d.families),
        parameter_size=d.parameter_size,
        quantization_level=d.quantization_level,
    )


def _listed(m: LocalModel) -> p.ListedModel:
    return p.ListedModel(
        name=m.name,
        model=m.name,
        modified_at=rfc3339(int(m.modified_at * 1e9)),
        size=m.size,
        digest=m.digest,
        details=details(m.details),
    )


def running_models(
    rows: list[PlacementView], models: Mapping[str, LocalModel], now_ns: int
) -> list[p.RunningModel]:
    """/api/ps: one entry per model, summed over its placements (``cluster_placements``).

    Sizes count every replica; the model expires when its last placement does
    (never, shown as Ollama shows it: the far future, if any placement stays).
    """
    forever = now_ns + _GO_MAX_DURATION
    by_model: dict[str, list[PlacementView]] = {}
    for row in rows:
        if row.failure is None:  # a model given up on runs nowhere
            by_model.setdefault(row.model, []).append(row)
    running = []
    for name, placed in by_model.items():
        model = models.get(name)
        expires = max(_expiry(r, now_ns, forever) for r in placed)
        running.append(
            p.RunningModel(
                name=name,
                model=name,
                size=sum((r.ram + r.vram) * r.replicas for r in placed),
                digest=model.digest if model else "",
                details=details(model.details if model else ModelDetails()),
                expires_at=rfc3339(expires),
                size_vram=sum(r.vram * r.replicas for r in placed),
                context_length=max(r.context or 0 for r in placed),
                placements=[
                    p.Placement(
                        node=r.node,
                        replicas=r.replicas,
                        status=r.status,
                        slots=r.slots,
                        in_flight=r.in_flight,
                    )
                    for r in placed
                ],
            )
        )
    return running


def _expiry(row: PlacementView, now_ns: int, forever: int) -> int:
    """When a placement unloads if no request comes (ns since the epoch).

    A busy placement has no expiry yet: as Ollama shows it, it is its keep-alive
    from now (the time it would get were the request to end now); kept forever
    when its keep-alive is forever or it is held (not unloaded below ``min``).
    """
    if row.expires_at is not None:
        return int(row.expires_at * 1e9)
    if row.keep_alive is None or row.held:
        return forever
    return now_ns + int(row.keep_alive * 1e9)


def show_response(model: LocalModel, metadata: Mapping[str, Any]) -> p.ShowResponse:
    """/api/show: the manifest's facts, the Modelfile they make, and the GGUF header.

    ``template`` is the manifest's, else the chat template Corral prompts with
    (the GGUF's own, or its replacement: ``nodes/chat_output/known_templates.py``),
    whose support for tools and thinking ``capabilities`` lists; arrays the
    header holds too long to show are ``[]``, as Ollama shows them unless asked
    to be verbose.
    """
    chat_template = effective_template(metadata.get("tokenizer.chat_template"))
    caps = template_caps(chat_template)
    capabilities = ["completion"]  # in Ollama's order: tools, vision, thinking
    capabilities += ["tools"] if caps.tools else []
    capabilities += ["vision"] if model.projector else []
    capabilities += ["thinking"] if caps.thinking else []
    if any(key.endswith(".pooling_type") for key in metadata):
        capabilities.append("embedding")
    return p.ShowResponse(
        license=model.license,
        modelfile=modelfile(model),
        parameters=parameters_text(model.parameters) or None,
        template=model.template or chat_template,
        system=model.system,
        details=details(model.details),
        model_info={k: [] if v is None else v for k, v in metadata.items()},
        capabilities=capabilities,
        modified_at=rfc3339(int(model.modified_at * 1e9)),
    )


def modelfile(model: LocalModel) -> str:
    """The Modelfile ``ollama show --modelfile`` prints for ``model``."""
    lines = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {model.name}",
        "",
        f"FROM {model.path}",
    ]
    if model.projector:  # a vision model's projector: Ollama's second FROM line
        lines.append(f"FROM {model.projector}")
    if model.template:
        lines.append(f"TEMPLATE {_quote(model.template)}")
    if model.system:
        lines.append(f"SYSTEM {_quote(model.system)}")
    for key, value in _parameter_items(model.parameters):
        lines.append(f"PARAMETER {key} {_quote(_go_text(value))}")
    if model.license:
        lines.append(f"LICENSE {_quote(model.license)}")
    return "\n".join(lines) + "\n"


def parameters_text(parameters: Mapping[str, Any]) -> str:
    """Ollama's text form of a model's parameters: a padded name and a Go value per line."""
    return "\n".join(
        f"{key:<{_PARAMETER_COLUMN}} {_go_literal(value)}"
        for key, value in _parameter_items(parameters)
    )


def _parameter_items(parameters: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) pairs sorted by name, one per item of a list (``stop``)."""
    items = []
    for key in sorted(parameters):
        value = parameters[key]
        items.extend((key, v) for v in (value if isinstance(value, list) else [value]))
    return items


def _go_text(value: Any) -> str:
    """A value as Go prints it: true, 1, 0.7 (never 1.0)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _go_literal(value: Any) -> str:
    """A value as Go's %#v prints it: strings quoted, numbers and booleans bare."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else _go_text(value)


def _quote(text: str) -> str:
    """Quote a Modelfile argument as Ollama does: only when it has a newline or edge spaces."""
    if "\n" in text or text.startswith(" ") or text.endswith(" "):
        return f'"""{text}"""' if '"' in text else f'"{text}"'
    return text


def rfc3339(ns: int) -> str:
    """A UTC time with nanoseconds as Go's RFC3339Nano writes it: trailing zeros trimmed."""
    seconds, fraction = divmod(ns, 10**9)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{fraction:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def ndjson(obj: Mapping[str, Any]) -> str:
    """One line of an Ollama stream."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def ndjson_error(exc: BaseException) -> str:
    """A failure after the stream began: one last line in Ollama's error shape."""
    return ndjson(classify(exc).ollama_body)
