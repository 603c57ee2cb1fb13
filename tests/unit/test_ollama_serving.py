"""Ollama protocol, the pure parts: request conversion, options, formats, response shapes.

No HTTP and no engine: ``test_ollama_api.py`` drives the routes over a real model.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime

import pytest
from pydantic import ValidationError

from deployments.ollama import protocol as p
from deployments.ollama.serving import (
    OLLAMA_DEFAULTS,
    _chat_piece,
    _generate_piece,
    _pieces,
    chat_to_engine,
    check_digest,
    create_recipe,
    embed_inputs,
    generate_to_engine,
    metrics_of,
    modelfile,
    output_format,
    parameters_text,
    rfc3339,
    running_models,
    sampling_params,
    shorten,
    show_response,
)
from deployments.views import PlacementView
from nodes.chat_output.calls import ToolCall, ToolChoice
from nodes.engine import (
    ChatMessage,
    Finished,
    TextDelta,
    ThinkingDelta,
    Timings,
    ToolCallEvent,
    Usage,
)
from nodes.errors import InvalidRequest
from nodes.models import LocalModel, ModelDetails, model_name
from tests.support.chat_models import QWEN3, QWEN25, template
from tests.support.views import placement_view

PLAIN = LocalModel(name="m:latest", path="/models/m.gguf", size=10, modified_at=0.0)
WITH_MANIFEST = LocalModel(
    name="terse:latest",
    path="/store/blobs/sha256-ab",
    size=10,
    modified_at=1_700_000_000.5,
    digest="d" * 64,
    details=ModelDetails(family="llama", families=("llama",), parameter_size="135M"),
    system="You are terse.",
    parameters={"temperature": 0.2, "stop": ["<|im_end|>", "END"], "num_ctx": 2048},
    license="Apache 2.0\nsee LICENSE",
)


def chat(**fields) -> p.ChatRequest:
    return p.ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def generate(**fields) -> p.GenerateRequest:
    return p.GenerateRequest.model_validate({"model": "m", "prompt": "hi", **fields})


# -- options -----------------------------------------------------------------------------


def test_unset_options_take_ollamas_defaults_not_llama_cpps():
    params = sampling_params(None, {})
    assert (params.temperature, params.top_k, params.top_p) == (0.8, 40, 0.9)
    assert (
        (params.min_p, params.repeat_penalty)
        == (0.0, 1.1)
        == (
            OLLAMA_DEFAULTS["min_p"],
            OLLAMA_DEFAULTS["repeat_penalty"],
        )
    )
    assert params.max_tokens is None and params.seed is None and params.num_ctx is None


def test_request_options_overlay_the_models_parameters():
    params = sampling_params({"temperature": 0.5, "seed": 3}, WITH_MANIFEST.parameters)
    assert params.temperature == 0.5  # the request wins
    assert params.stop == ("<|im_end|>", "END") and params.num_ctx == 2048  # the manifest's
    assert params.seed == 3 and params.top_k == 40  # Ollama's default
    assert sampling_params({"stop": ["x"]}, WITH_MANIFEST.parameters).stop == ("x",)


def test_every_honoured_option_reaches_the_engine():
    params = sampling_params(
        {
            "num_ctx": 1024,
            "num_predict": 7,
            "temperature": 0,
            "top_k": 5.0,  # JSON numbers: Go truncates them into int options
            "top_p": 0.5,
            "min_p": 0.1,
            "seed": 42,
            "stop": "END",
            "repeat_penalty": 1.3,
            "presence_penalty": 0.2,
            "frequency_penalty": 0.4,
        },
        {},
    )
    assert (params.num_ctx, params.max_tokens, params.temperature) == (1024, 7, 0.0)
    assert (params.top_k, params.top_p, params.min_p, params.seed) == (5, 0.5, 0.1, 42)
    assert params.stop == ("END",)
    assert (params.repeat_penalty, params.presence_penalty, params.frequency_penalty) == (
        1.3,
        0.2,
        0.4,
    )


@pytest.mark.parametrize("num_predict", [-1, -2])
def test_negative_num_predict_and_seed_mean_no_limit_and_a_random_seed(num_predict):
    params = sampling_params({"num_predict": num_predict, "seed": -1}, {})
    assert params.max_tokens is None and params.seed is None


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": "hot"}, "options.temperature"),
        ({"top_k": True}, "options.top_k"),
        ({"num_predict": "5"}, "options.num_predict"),
        ({"num_predict": math.inf}, "options.num_predict"),
        ({"stop": [1, 2]}, "options.stop"),
        ({"stop": {"a": 1}}, "options.stop"),
        # numbers no sampler takes: beyond a float (10**400), a float32, NaN, 64 bits
        ({"num_ctx": 10**400, "temperature": 10**400}, "options.temperature"),
        ({"top_p": 1e300}, "options.top_p"),
        ({"min_p": math.nan}, "options.min_p"),
        ({"seed": 2**80}, "options.seed"),
        ({"num_ctx": 0}, "options.num_ctx"),
    ],
)
def test_options_of_the_wrong_type_are_refused_naming_the_option(options, param):
    with pytest.raises(InvalidRequest) as err:
        sampling_params(options, {})
    assert err.value.param == param and param.removeprefix("options.") in err.value.message


def test_options_corral_cannot_set_per_request_are_logged_and_ignored(caplog):
    with caplog.at_level(logging.INFO, logger="corral.ollama"):
        greq = chat_to_engine(chat(options={"num_gpu": 99, "num_thread": 8, "top_k": 3}), PLAIN)
    assert greq.params.top_k == 3
    assert "num_gpu, num_thread" in caplog.text


def test_unknown_fields_are_logged_and_think_reaches_the_engine(caplog):
    with caplog.at_level(logging.INFO, logger="corral.ollama"):
        greq = chat_to_engine(chat(think=True, shift=False), PLAIN)
    assert "shift" in caplog.text and "think" not in caplog.text
    assert greq.think is True
    assert chat_to_engine(chat(think="high"), PLAIN).think == "high"
    assert generate_to_engine(generate(think=False), PLAIN).think is False
    with pytest.raises(InvalidRequest) as err:
        chat_to_engine(chat(think="max"), PLAIN)
    assert err.value.param == "think"


# -- format ------------------------------------------------------------------------------


def test_format_selects_json_mode_or_a_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert output_format(None) == output_format("") == (False, None)
    assert output_format("json") == (True, None)
    assert output_format(schema) == (False, schema)
    assert chat_to_engine(chat(format="json"), PLAIN).params.json_mode
    assert generate_to_engine(generate(format=schema), PLAIN).params.json_schema == schema


@pytest.mark.parametrize("fmt", ["yaml", 3, ["json"], True])
def test_other_formats_are_refused(fmt):
    with pytest.raises(InvalidRequest) as err:
        output_format(fmt)
    assert err.value.param == "format" and "json" in err.value.message


# -- chat and generate -------------------------------------------------------------------


def test_chat_gets_the_models_system_prompt_unless_it_has_one():
    greq = chat_to_engine(chat(), WITH_MANIFEST)
    assert greq.messages == (
        ChatMessage("system", "You are terse."),
        ChatMessage("user", "hi"),
    )
    own = [{"role": "System", "content": "Be loud."}, {"role": "USER", "content": "hi"}]
    greq = chat_to_engine(chat(messages=own, keep_alive="1m"), WITH_MANIFEST)
    assert greq.messages == (ChatMessage("system", "Be loud."), ChatMessage("user", "hi"))
    assert greq.keep_alive == 60.0 and greq.params.temperature == 0.2


def test_generate_wraps_the_prompt_in_a_chat_unless_raw():
    assert generate_to_engine(generate(), WITH_MANIFEST).messages == (
        ChatMessage("system", "You are terse."),
        ChatMessage("user", "hi"),
    )
    assert generate_to_engine(generate(system="Rhyme."), WITH_MANIFEST).messages[0] == (
        ChatMessage("system", "Rhyme.")
    )
    assert generate_to_engine(generate(), PLAIN).messages == (ChatMessage("user", "hi"),)
    raw = generate_to_engine(generate(prompt="<|im_start|>user\nhi", raw=True), WITH_MANIFEST)
    assert raw.prompt == "<|im_start|>user\nhi" and raw.messages is None


def test_keep_alive_takes_durations_numbers_and_negative_as_forever():
    assert generate_to_engine(generate(keep_alive="1h30m"), PLAIN).keep_alive == 5400.0
    assert generate_to_engine(generate(keep_alive=0), PLAIN).keep_alive == 0.0
    assert generate_to_engine(generate(keep_alive=-1), PLAIN).keep_alive == math.inf
    with pytest.raises(ValidationError):
        generate(keep_alive="soon")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"images": ["aGk="]}, "images"),
        ({"suffix": "return x"}, "suffix"),
        ({"template": "{{ .Prompt }}"}, "template"),
        ({"context": [1, 2, 3]}, "context"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_what_generate_cannot_do_is_refused_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as err:
        generate_to_engine(generate(**fields), PLAIN)
    assert err.value.param == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"description": "f"}}]},
            "tools.0.function.name",
        ),
        ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "messages.0.images"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                    }
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_what_chat_cannot_do_is_refused_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as err:
        chat_to_engine(chat(**fields), PLAIN)
    assert err.value.param == param


def test_an_empty_tool_list_is_what_the_ollama_client_always_sends():
    assert chat_to_engine(chat(tools=[]), PLAIN).messages == (ChatMessage("user", "hi"),)


def test_roles_are_ollamas_four_and_null_content_is_empty():
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "robot", "content": "x"}])
    greq = chat_to_engine(chat(messages=[{"role": "Assistant", "content": None}]), PLAIN)
    assert greq.messages == (ChatMessage("assistant", ""),)


# -- names, digests, embeddings, create -----------------------------------------------------


def test_model_names_are_normalised_or_refused():
    assert model_name("llama3.2") == "llama3.2:latest"
    assert model_name("hf.co/org/repo:Q4_K_M") == "hf.co/org/repo:Q4_K_M"
    for bad in ("../../etc/passwd", "a b", "x:", "/abs", ""):
        with pytest.raises(InvalidRequest) as err:
            model_name(bad, "source")
        assert err.value.param == "source"


def test_digests_are_sha256_and_64_lowercase_hex():
    good = "sha256:" + "0" * 64
    assert check_digest(good) == good
    for bad in ("sha256-" + "0" * 64, "sha256:" + "A" * 64, "sha256:abc", "md5:" + "0" * 64):
        with pytest.raises(InvalidRequest):
            check_digest(bad)


def test_embed_inputs_and_dimensions():
    assert embed_inputs(p.EmbedRequest(model="m", input="a")) == ["a"]
    assert embed_inputs(p.EmbedRequest(model="m", input="")) == []
    assert embed_inputs(p.EmbedRequest(model="m", input=[])) == []
    with pytest.raises(InvalidRequest) as err:
        embed_inputs(p.EmbedRequest(model="m", input=["a", ""]))
    assert err.value.param == "input.1"
    assert shorten([0.6, 0.8, 0.0], None) == [0.6, 0.8, 0.0]
    assert shorten([0.6, 0.8, 0.0], 5) == [0.6, 0.8, 0.0]
    assert shorten([0.3, 0.4, 0.866], 2) == pytest.approx([0.6, 0.8])


def test_create_takes_ollamas_fields_and_refuses_what_corral_cannot_build():
    req = p.CreateRequest.model_validate(
        {"model": "x", "from": "m", "system": "S", "parameters": {"top_k": 3}, "license": None}
    )
    assert create_recipe(req) == {"from": "m", "system": "S", "parameters": {"top_k": 3}}
    legacy = p.CreateRequest.model_validate({"name": "x", "files": {"a.gguf": "sha256:0"}})
    assert legacy.model == "x" and create_recipe(legacy) == {"files": {"a.gguf": "sha256:0"}}
    for fields, param in [
        ({"quantize": "q4_K_M"}, "quantize"),
        ({"quantization": "q4_K_M"}, "quantize"),
        ({"adapters": {"l.gguf": "sha256:1"}}, "adapters"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages"),
        ({"modelfile": "FROM llama3"}, "modelfile"),
        ({"parameters": {"temperature": "warm"}}, "options.temperature"),
    ]:
        with pytest.raises(InvalidRequest) as err:
            create_recipe(p.CreateRequest.model_validate({"model": "x", "from": "m", **fields}))
        assert err.value.param == param


# -- responses ----------------------------------------------------------------------------


def test_metrics_are_integer_nanoseconds_and_add_up():
    finished = Finished(
        "stop",
        Usage(prompt_tokens=12, completion_tokens=30),
        Timings(queued=0.25, prompt=0.125, generation=1.5),
    )
    m = metrics_of(finished, started=10.0, admitted=12.0, ended=13.0)
    assert (m.load_duration, m.prompt_eval_duration, m.eval_duration) == (
        2 * 10**9,
        125 * 10**6,
        15 * 10**8,
    )
    assert (m.prompt_eval_count, m.eval_count) == (12, 30)
    # The engine's clock ran apart from ours: the total still holds every phase.
    assert m.total_duration == (2 + 0.25 + 0.125 + 1.5) * 10**9
    later = metrics_of(finished, started=10.0, admitted=12.0, ended=20.0)
    assert later.total_duration == 10 * 10**9


def test_times_are_rfc3339_with_nanoseconds_like_go():
    assert rfc3339(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert rfc3339(1_700_000_000_500_000_000) == "2023-11-14T22:13:20.5Z"
    assert rfc3339(1_700_000_000 * 10**9) == "2023-11-14T22:13:20Z"
    parsed = datetime.fromisoformat(rfc3339(1_700_000_000_250_000_000))
    assert parsed.timestamp() == 1_700_000_000.25


def placements(rows: list[dict]) -> list[PlacementView]:
    """The controller's placement rows, with what a test does not care about filled in."""
    return [placement_view(**row) for row in rows]


def test_ps_sums_a_models_placements_and_joins_the_library():
    rows = [
        {
            "model": "terse:latest",
            "node": "gpubox",
            "replicas": 2,
            "ram": 100,
            "vram": 400,
            "context": 4096,
            "expires_at": 1_700_000_100.0,
            "status": "RUNNING",
        },
        {
            "model": "terse:latest",
            "node": "nas",
            "replicas": 1,
            "ram": 300,
            "vram": 0,
            "context": 2048,
            "expires_at": 1_700_000_200.0,
            "status": "RUNNING",
        },
        {
            "model": "gone:latest",
            "node": "nas",
            "replicas": 1,
            "ram": 5,
            "vram": 0,
            "context": 512,
            "expires_at": None,
            "status": "DEPLOYING",
        },
    ]
    now = 1_700_000_000 * 10**9
    terse, gone = running_models(placements(rows), {"terse:latest": WITH_MANIFEST}, now)
    assert (terse.size, terse.size_vram, terse.context_length) == (2 * 500 + 300, 800, 4096)
    assert terse.expires_at == rfc3339(1_700_000_200 * 10**9)  # the last one to go
    assert terse.digest == "d" * 64 and terse.details.parameter_size == "135M"
    assert [(q.node, q.replicas) for q in terse.placements] == [("gpubox", 2), ("nas", 1)]
    # Never expires: Ollama's far future (now + Go's longest duration, some 292 years).
    assert datetime.fromisoformat(gone.expires_at).year == 2316
    assert gone.digest == "" and gone.details.family == ""


def test_show_gives_the_manifest_the_modelfile_and_the_gguf_header():
    metadata = {
        "general.architecture": "llama",
        "llama.context_length": 8192,
        "llama.pooling_type": 1,
        "tokenizer.ggml.tokens": None,  # too long to show
        "tokenizer.chat_template": "{% for m in messages %}...",
    }
    show = show_response(WITH_MANIFEST, metadata)
    assert show.system == "You are terse." and show.license == WITH_MANIFEST.license
    assert show.template == "{% for m in messages %}..."  # the GGUF's: the manifest has none
    assert show.model_info["tokenizer.ggml.tokens"] == []
    assert show.model_info["llama.context_length"] == 8192
    assert show.capabilities == ["completion", "embedding"]
    assert show.details.families == ["llama"]
    assert show.modified_at == "2023-11-14T22:13:20.5Z"
    bare = show_response(PLAIN, {"general.architecture": "llama"})
    assert bare.capabilities == ["completion"] and bare.parameters is None and bare.system is None


def test_parameters_and_modelfile_read_as_ollama_writes_them():
    assert parameters_text(WITH_MANIFEST.parameters).splitlines() == [
        "num_ctx" + " " * 24 + "2048",
        "stop" + " " * 27 + '"<|im_end|>"',
        "stop" + " " * 27 + '"END"',
        "temperature" + " " * 20 + "0.2",
    ]
    assert parameters_text({"top_k": 40.0, "penalize_newline": True}).splitlines() == [
        "penalize_newline" + " " * 15 + "true",
        "top_k" + " " * 26 + "40",
    ]
    text = modelfile(WITH_MANIFEST)
    assert text.startswith('# Modelfile generated by "ollama show"\n')
    assert "# FROM terse:latest\n\nFROM /store/blobs/sha256-ab\n" in text
    assert "SYSTEM You are terse.\n" in text
    assert "PARAMETER stop <|im_end|>\nPARAMETER stop END\n" in text
    assert 'LICENSE "Apache 2.0\nsee LICENSE"\n' in text
    quoted = LocalModel(name="q", path="/q", size=0, modified_at=0, template='{{ "a" }}\n')
    assert 'TEMPLATE """{{ "a" }}\n"""' in modelfile(quoted)


# -- tools, thinking, and what /api/ps and /api/show say ---------------------------------------


def test_tool_turns_as_ollama_and_open_webui_send_them():
    greq = chat_to_engine(
        chat(
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "thinking": "weather!",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "function": {
                                "index": 0,
                                "name": "get_weather",
                                "arguments": {"city": "Paris"},
                            },
                        }
                    ],
                },
                {"role": "tool", "content": "Sunny", "tool_name": "get_weather"},  # Ollama's
                {"role": "tool", "content": "Sunny", "tool_call_id": "call_1"},  # Open WebUI's
            ],
            tools=[{"type": "function", "function": {"name": "get_weather"}}],
        ),
        PLAIN,
    )
    assistant, by_name, by_id = greq.messages[1:]
    assert assistant.tool_calls == (ToolCall("get_weather", {"city": "Paris"}, "call_1"),)
    assert assistant.thinking == "weather!"
    assert (by_name.tool_name, by_name.tool_call_id) == ("get_weather", "call_1")
    assert (by_id.tool_name, by_id.tool_call_id) == ("get_weather", "call_1")
    assert greq.tool_choice == ToolChoice("auto") and [t.name for t in greq.tools] == [
        "get_weather"
    ]


def test_stream_objects_as_ollama_streams_them():
    call = ToolCall("get_weather", {"city": "Paris", "units": None}, "call_x")
    batch = [ThinkingDelta("Hm"), ThinkingDelta("m."), TextDelta("OK"), ToolCallEvent(0, call)]
    pieces = [o.model_dump(exclude_none=True)["message"] for o in _pieces(batch, "m", _chat_piece)]
    assert pieces == [
        {"role": "assistant", "content": "", "thinking": "Hmm."},
        {"role": "assistant", "content": "OK"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_x",
                    "function": {
                        "index": 0,
                        "name": "get_weather",
                        "arguments": {"city": "Paris", "units": None},
                    },
                }
            ],
        },
    ]
    [generated] = _pieces([ThinkingDelta("x")], "m", _generate_piece)
    assert generated.model_dump(exclude_none=True)["thinking"] == "x"


def test_ps_shows_a_busy_model_expiring_its_keep_alive_from_now():
    base = {"node": "nas", "replicas": 1, "ram": 5, "vram": 0, "context": 512, "status": "RUNNING"}
    now = 1_700_000_000 * 10**9
    rows = [
        {**base, "model": "busy:latest", "expires_at": None, "keep_alive": 300.0},
        {**base, "model": "held:latest", "expires_at": None, "keep_alive": 300.0, "held": True},
        {**base, "model": "forever:latest", "expires_at": None, "keep_alive": None},
    ]
    busy, held, forever = running_models(placements(rows), {}, now)
    assert busy.expires_at == rfc3339(now + 300 * 10**9)
    assert (
        datetime.fromisoformat(held.expires_at).year
        == datetime.fromisoformat(forever.expires_at).year
        == 2316
    )


def test_show_lists_tools_and_thinking_where_the_template_has_them():
    qwen3 = {"general.architecture": "qwen3", "tokenizer.chat_template": template(QWEN3)}
    assert show_response(PLAIN, qwen3).capabilities == ["completion", "tools", "thinking"]
    qwen25 = {"tokenizer.chat_template": template(QWEN25)}
    assert show_response(PLAIN, qwen25).capabilities == ["completion", "tools"]
