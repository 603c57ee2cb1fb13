"""Chat templates that leave out the tool calling their model was trained for, and the
template used instead (known by the exact text of the GGUF's template).

SmolLM2 (the starter model among them) ships a plain ChatML template, yet was
trained to call tools, and Ollama's library gives it a template that offers
them (``ollama show smollm2:135m``: capabilities ``tools``). Its replacement
below is that template in Jinja: without tools it renders exactly what the
GGUF's own does; with tools it adds Ollama's system prompt for them, and
renders calls and results the way SmolLM2 writes them:
``<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>``.
"""

from __future__ import annotations

import hashlib

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SMOLLM2_TOOLS_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of "
    "possible functions.\nBased on the question, you will need to make one or more "
    "function/tool calls to achieve the purpose.\nIf none of the functions can be used, point "
    "it out and refuse to answer.\nIf the given question lacks the parameters required by the "
    "function, also point it out.\nYou have access to the following tools:\n<tools>"
)
_SMOLLM2_TOOLS_FORMAT = (
    "</tools>\nThe output MUST strictly adhere to the following format, and NO other text MUST "
    "be included.\nThe example format is as follows. Please make sure the parameter type is "
    "correct. If no function call is needed, please make the tool calls an empty list '[]'.\n"
    '<tool_call>[\n{"name": "func_name1", "arguments": {"argument1": "value1", "argument2": '
    '"value2"}},\n(more tool calls as required)\n]</tool_call>'
)

SMOLLM2_TOOLS = (
    "{%- set default_system = 'You are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face' -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and (tools or message['role'] != 'system') -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] -}}"
    "{%- if tools -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- elif not tools -%}{{- default_system -}}{%- endif -%}"
    "{%- if tools -%}{{- " + repr(_SMOLLM2_TOOLS_PROMPT) + " -}}"
    "{{- tools | tojson -}}"
    "{{- " + repr(_SMOLLM2_TOOLS_FORMAT) + " -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- if message['role'] == 'system' -%}{%- continue -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message.tool_calls -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if message['content'] -%}{{- message['content'] + '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>[\\n' -}}"
    "{%- for call in message.tool_calls -%}"
    "{%- set call = call.function if call.function is defined else call -%}"
    '{{- \'{"name": "\' + call.name + \'", "arguments": \' -}}'
    "{%- if call.arguments is string -%}{{- call.arguments -}}"
    "{%- else -%}{{- call.arguments | tojson -}}{%- endif -%}"
    "{{- '}' -}}{%- if not loop.last -%}{{- ',\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '\\n]</tool_call><|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + "
    "'\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_REPLACEMENTS = {hashlib.sha256(SMOLLM2.encode()).hexdigest(): SMOLLM2_TOOLS}


def effective_template(source: str | None) -> str | None:
    """The template to prompt with for a GGUF whose own template is ``source``."""
    if source is None:
        return None
    return _REPLACEMENTS.get(hashlib.sha256(source.encode()).hexdigest(), source)
