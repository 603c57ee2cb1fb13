"""What real chat templates support, found by rendering them, and the plan made from it.

The templates are real ones (``tests/fixtures/chat_templates``, from llama.cpp's
test set) plus the starter model's own ChatML, which knows no tools.
"""

from __future__ import annotations

import pytest

from nodes.chat_output.calls import Tool, ToolCall, ToolChoice
from nodes.chat_output.known_templates import SMOLLM2, SMOLLM2_TOOLS, effective_template
from nodes.chat_output.plan import (
    check_request,
    plan_output,
    template_kwargs,
    template_messages,
)
from nodes.chat_output.template import TemplateCaps, jinja_renderer, template_caps
from nodes.engine import ChatMessage
from nodes.errors import InvalidRequest
from nodes.gguf import read_gguf
from tests.support.chat_models import template

# template file -> (tools, family, thinking tags)
EXPECTED = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": (True, "hermes", None),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": (True, "hermes", None),
    "Qwen-Qwen3-0.6B.jinja": (True, "hermes", ("<think>", "</think>")),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": (True, "llama3", None),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": (True, "llama3", None),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": (True, "mistral", None),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": (False, "json", ("<think>", "</think>")),
    "google-gemma-2-2b-it.jinja": (False, "json", None),
}
STRING_ARGS = (  # a template that writes the arguments as they come: a JSON string
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.arguments }}</call>{% endfor %}\n"
    "{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
)
WEATHER = Tool(
    "get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}}
)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_templates(name):
    caps = template_caps(template(name))
    tools, family, think_tags = EXPECTED[name]
    assert (caps.tools, caps.think_tags) == (tools, think_tags)
    if tools:
        assert caps.family == family and caps.tool_calls and caps.object_arguments
        assert caps.capabilities()[0] == "tools"
    assert ("thinking" in caps.capabilities()) == (think_tags is not None)


def test_the_starter_model_prompts_with_the_tool_template_ollama_gives_smollm2(starter_path):
    source = read_gguf(starter_path).metadata["tokenizer.chat_template"]
    assert template_caps(source).capabilities() == []  # the GGUF's own: plain ChatML
    assert effective_template(source) == SMOLLM2_TOOLS
    assert template_caps(SMOLLM2_TOOLS).capabilities() == ["tools"]
    assert template_caps(None) == template_caps("{% broken") == TemplateCaps()
    assert effective_template("{{ other }}") == "{{ other }}" and effective_template(None) is None


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    ],
)
def test_without_tools_the_replacement_renders_what_the_ggufs_own_template_does(messages):
    assert jinja_renderer(SMOLLM2_TOOLS)(messages, None) == jinja_renderer(SMOLLM2)(messages, None)


def test_smollm2s_tool_turns_are_written_as_it_was_trained_to_write_them():
    history = (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather?"),
        ChatMessage(
            "assistant", "", tool_calls=(ToolCall("get_weather", {"city": "Paris"}, "c1"),)
        ),
        ChatMessage("tool", "Sunny", tool_call_id="c1", tool_name="get_weather"),
    )
    caps = template_caps(SMOLLM2_TOOLS)
    text = jinja_renderer(SMOLLM2_TOOLS)(template_messages(history, caps), [WEATHER.as_openai()])
    assert text.startswith(
        "<|im_start|>system\nBe brief.\n\nYou are an expert in composing functions."
    )
    assert (
        '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n]</tool_call>'
        in text
    )
    assert "<tool_response>\nSunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_arguments_go_as_the_template_takes_them():
    caps = template_caps(STRING_ARGS)
    assert caps.tools and caps.tool_calls and not caps.object_arguments
    history = (
        ChatMessage("user", "Weather?"),
        ChatMessage(
            "assistant", "", tool_calls=(ToolCall("get_weather", {"city": "Paris"}, "c1"),)
        ),
    )
    text = jinja_renderer(STRING_ARGS)(template_messages(history, caps), None)
    assert '<call>{"city": "Paris"}</call>' in text
    qwen = template_caps(template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    rendered = jinja_renderer(template("Qwen-Qwen2.5-7B-Instruct.jinja"))(
        template_messages(history, qwen), [WEATHER.as_openai()]
    )
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in rendered


def test_tool_turns_reach_the_template_in_openais_shape():
    caps = template_caps(template("Qwen-Qwen3-0.6B.jinja"))
    messages = template_messages(
        (
            ChatMessage("assistant", "", tool_calls=(ToolCall("f", {}, "call_1"),), thinking="hm"),
            ChatMessage("tool", "42", tool_call_id="call_1", tool_name="f"),
        ),
        caps,
    )
    assert messages == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {}}}
            ],
            "reasoning_content": "hm",
        },
        {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "f"},
    ]


def test_mistral_gets_the_nine_character_ids_it_insists_on():
    source = template("mistralai-Mistral-Nemo-Instruct-2407.jinja")
    caps = template_caps(source)
    history = (
        ChatMessage("user", "Weather?"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("get_weather", {}, "call_abcdefgh"),)),
        ChatMessage("tool", "Sunny", tool_call_id="call_abcdefgh", tool_name="get_weather"),
        ChatMessage("assistant", "It is sunny."),
        ChatMessage("user", "Thanks"),
    )
    messages = template_messages(history, caps)
    call_id = messages[1]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum() and messages[2]["tool_call_id"] == call_id
    assert "[TOOL_RESULTS]" in jinja_renderer(source)(messages, [WEATHER.as_openai()])


def test_refusals_speak_ollamas_words():
    plain = TemplateCaps()
    with pytest.raises(InvalidRequest) as err:
        check_request("smollm2:135m", plain, (WEATHER,), ToolChoice(), None)
    assert err.value.message == "smollm2:135m does not support tools"
    with pytest.raises(InvalidRequest) as err:
        check_request("smollm2:135m", plain, (), ToolChoice(), True)
    assert err.value.message == '"smollm2:135m" does not support thinking'
    # tools the model is not shown, and thinking turned off, ask for nothing
    check_request("smollm2:135m", plain, (WEATHER,), ToolChoice("none"), False)


def test_thinking_reaches_the_template_and_the_plan():
    qwen3 = template_caps(template("Qwen-Qwen3-0.6B.jinja"))
    assert template_kwargs(qwen3, None) == {"enable_thinking": True}
    assert template_kwargs(template_caps(template("Qwen-Qwen2.5-7B-Instruct.jinja")), True) == {}
    assert template_kwargs(qwen3, False) == {"enable_thinking": False}
    assert template_kwargs(qwen3, "high") == {"enable_thinking": True}
    assert plan_output(qwen3, "...<|im_start|>assistant\n", (), ToolChoice(), None).think_tags
    off = plan_output(qwen3, "...assistant\n<think>\n\n</think>\n\n", (), ToolChoice(), False)
    assert off.think_tags is None and off.parser() is None
    r1 = template_caps(template("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"))
    opened = plan_output(r1, "<｜User｜>Hi<｜Assistant｜><think>\n", (), ToolChoice(), None)
    assert opened.thinking_open and opened.think_tags == ("<think>", "</think>")


def test_a_forced_call_gets_a_grammar_in_the_familys_markup():
    qwen = template_caps(template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    auto = plan_output(qwen, "", (WEATHER,), ToolChoice(), None)
    assert auto.family == "hermes" and auto.tool_names == ("get_weather",) and auto.grammar is None
    forced = plan_output(qwen, "", (WEATHER,), ToolChoice("required"), None)
    assert forced.grammar and 'root ::= "<tool_call>\\n" call "\\n</tool_call>"\n' in forced.grammar
    assert plan_output(qwen, "", (WEATHER,), ToolChoice("none"), None).family is None
