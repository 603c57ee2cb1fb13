"""``corral run``: answer one prompt, or chat with a model, the way ``ollama run`` does.

With a prompt (from the arguments, stdin, or both) it streams one answer and
exits; on a terminal with no prompt it loads the model and opens the chat:
history kept, ``/clear``, ``/bye``, ``\"\"\"`` for several lines, Ctrl-C to
stop an answer.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from cluster.api_client import ServerError, call, chat
from cluster.cli_app import ConfigOption, HostOption, app, corral, fail
from nodes.durations import parse_duration

HELP = """Available commands:
  /clear          Forget the conversation so far
  /bye            Exit (or Ctrl-D)
  /?, /help       This help

Use \"\"\" to begin a multi-line message, and \"\"\" again to end it.
Ctrl-C stops an answer.
"""


def stdin_is_tty() -> bool:
    """Whether a person types at stdin (tests make ``run`` believe so)."""
    return sys.stdin.isatty()


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="The model to talk to.")],
    prompt: Annotated[
        list[str] | None, typer.Argument(help="Ask this and exit (default: a chat).")
    ] = None,
    keepalive: Annotated[
        str | None,
        typer.Option("--keepalive", help="How long to keep it loaded after (5m, 1h, 0, -1)."),
    ] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="json, or a JSON schema for the answer.")
    ] = None,
    host: HostOption = None,
    config: ConfigOption = None,
) -> None:
    """Chat with a model, or answer one prompt (from the arguments or stdin) and exit."""
    request: dict[str, Any] = {"model": model, "stream": True}
    if keepalive is not None:
        try:
            parse_duration(keepalive)
        except ValueError as exc:
            raise fail(f"--keepalive: {exc}", 2) from None
        request["keep_alive"] = keepalive
    if format is not None:
        request["format"] = _format(format)
    words = list(prompt or [])
    if not stdin_is_tty():
        words.insert(0, sys.stdin.read())
    with corral(host, config) as client:
        if words:
            text = " ".join(words).strip()
            if not text:
                raise fail("the prompt is empty", 2)
            chat(client, {**request, "messages": [{"role": "user", "content": text}]}, _write)
            print()
            return
        with Console(stderr=True).status(f"Loading {model}..."):
            load_body = {k: v for k, v in request.items() if k in ("model", "keep_alive")}
            call(client, "POST", "/api/generate", {**load_body, "stream": False})
        chat_loop(client, request)


def _format(value: str) -> Any:
    if value == "json":
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise fail("--format takes json or a JSON schema", 2) from None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def read_message() -> str:
    """One message from the user: a line, or the lines between two ``\"\"\"``."""
    line = input(">>> ")
    if not line.lstrip().startswith('"""'):
        return line
    text = line.lstrip()[3:]
    while not text.rstrip().endswith('"""'):
        text += "\n" + input("... ")
    return text.rstrip()[:-3]


def chat_loop(client: httpx.Client, request: dict[str, Any]) -> None:
    """The interactive chat: history kept, ``/bye`` or EOF leaves, Ctrl-C stops an answer."""
    if sys.stdin.isatty():
        # Importing readline is what gives input() line editing and history; it changes
        # the terminal, so only a chat a person types into takes it (not piped input).
        import readline  # noqa: F401
    errors = Console(stderr=True)
    history: list[dict[str, str]] = []
    while True:
        try:
            text = read_message()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.")
            continue
        command = text.strip()
        if command == "/bye":
            return
        if command == "/clear":
            history.clear()
            print("Cleared session context")
            continue
        if command in ("/?", "/help"):
            print(HELP)
            continue
        if command.startswith("/"):
            print(f"Unknown command '{command.split()[0]}'. Type /? for help")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": text})
        try:
            answer = chat(client, {**request, "messages": history}, _write)
        except (KeyboardInterrupt, ServerError) as exc:
            history.pop()  # no answer: forget the question too
            print()
            if isinstance(exc, ServerError):
                errors.print(f"[red]error:[/] {exc}", highlight=False)
            continue
        history.append({"role": "assistant", "content": answer})
        print("\n")
