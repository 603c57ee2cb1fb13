"""Tool calls and thinking: how requests reach a chat template, and how output is read back.

Pure code (no llama.cpp calls, no I/O) except ``grammar``, which uses
llama-cpp-python's JSON-schema converter:

* ``calls``: tools, tool calls, the tool choice and ``think``, checked;
* ``template``: what a chat template supports, and its tool-call family;
* ``known_templates``: templates that leave out their model's tool calling (SmolLM2);
* ``parsers``: one streaming parser per tool-call format, and the thinking splitter;
* ``grammar``: GBNF forcing a call, for ``tool_choice: "required"``;
* ``plan``: from a request and a template to an ``OutputPlan``;
* ``reader``: an output read as its plan says, into the engine's events.
"""
