"""Copies of the starter model with another chat template, for tool and thinking tests.

The starter model's own template (ChatML) knows no tools. A copy with the same
tensors and the chat template of Qwen 2.5 (tools, ``<tool_call>``) is a model
whose template supports tools; one with DeepSeek-R1's template (its prompt
opens ``<think>``, so every answer starts in thinking) is a thinking model.
Their text is nonsense, but the prompts, the grammar and the parsing are the
real ones. Templates come from ``tests/fixtures/chat_templates`` (see its README).
"""

from __future__ import annotations

from pathlib import Path

import gguf

TEMPLATES = Path(__file__).parent.parent / "fixtures" / "chat_templates"
QWEN25 = "Qwen-Qwen2.5-7B-Instruct.jinja"  # tools, Hermes-style <tool_call>
QWEN3 = "Qwen-Qwen3-0.6B.jinja"  # tools and <think>, enable_thinking
R1 = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"  # <think> opened by the prompt
TOOLS_MODEL = "tools:135m"  # the names the tests register them under
THINKING_MODEL = "thinker:135m"


def template(name: str) -> str:
    """A chat template of the fixtures by file name."""
    return (TEMPLATES / name).read_text()


def with_chat_template(source: Path, target: Path, chat_template: str) -> Path:
    """Write ``target``: the GGUF ``source`` with ``chat_template`` as its template."""
    reader = gguf.GGUFReader(source, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        if field.name.startswith(gguf.Keys.Tokenizer.CHAT_TEMPLATE):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    writer.add_chat_template(chat_template)
    for tensor in reader.tensors:
        data = tensor.data
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return target
