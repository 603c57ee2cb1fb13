"""The official ``openai`` client's Responses API (``client.responses``) against the
session's Corral on Ray: whole and streamed (through the SDK's own event accumulator),
a function tool round trip, reasoning, structured output and the errors.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.tool_rounds import QUESTION, responses_create, responses_round_trip

STARTER = "smollm2:135m"
ASK = {
    "model": STARTER,
    "instructions": "You answer in one short sentence.",
    "input": "What is the capital of France?",
    "temperature": 0,
    "max_output_tokens": 32,
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_response(openai_client, stream):
    r = responses_create(openai_client, stream=stream, **ASK)
    assert r.object == "response" and r.status == "completed" and r.model == STARTER
    [message] = r.output
    assert message.type == "message" and message.role == "assistant"
    assert "Paris" in r.output_text
    assert r.usage.input_tokens > 20 and 0 < r.usage.output_tokens < 32
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_streamed_text_is_the_whole_text(openai_client):
    whole = openai_client.responses.create(**ASK)
    events = list(openai_client.responses.create(stream=True, **ASK))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    short = openai_client.responses.create(**{**ASK, "max_output_tokens": 3})
    assert short.status == "incomplete"
    assert short.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("which", ["starter", "qwen2.5-template"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_function_tool_round_trip(openai_client, chat_models, which, stream):
    model = STARTER if which == "starter" else chat_models[0]
    responses_round_trip(openai_client, model, stream=stream)


def test_reasoning_comes_as_a_reasoning_item(openai_client, chat_models):
    ask = {"model": chat_models[1], "input": QUESTION, "max_output_tokens": 12, "temperature": 0}
    r = openai_client.responses.create(reasoning={"effort": "medium"}, **ask)
    reasoning = r.output[0]
    assert reasoning.type == "reasoning" and reasoning.content[0].text
    streamed = responses_create(openai_client, stream=True, **ask)
    assert streamed.output[0].content[0].text == reasoning.content[0].text


def test_a_json_schema_format(openai_client):
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string"}},
        "required": ["capital"],
    }
    r = openai_client.responses.create(
        **ASK | {"max_output_tokens": 64},
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
    )
    assert isinstance(json.loads(r.output_text)["capital"], str)


def test_errors(openai_client):
    with pytest.raises(openai.NotFoundError) as err:
        openai_client.responses.create(model="ghost:7b", input="hi")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.responses.create(**ASK, previous_response_id="resp_123")
    assert err.value.param == "previous_response_id"
    assert "keeps no responses" in err.value.message
