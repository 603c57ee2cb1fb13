"""``corral run``: one prompt from the arguments or stdin, and the interactive chat, against
a fake Ollama API (``tests/support/fake_corral.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from cluster import cli_chat
from tests.support.fake_corral import FakeCorral, answer, corral, fake_corral, ndjson


@pytest.fixture
def server(monkeypatch) -> FakeCorral:
    return fake_corral(monkeypatch)


def test_run_with_a_prompt_streams_one_answer(server):
    server.route("POST", "/api/chat", content=answer("Paris", " is the capital."))
    result = corral(
        "run", "llama3.2", "capital", "of", "France?", "--keepalive", "10m", "--format", "json"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "Paris is the capital.\n"
    assert server.bodies("/api/chat") == [
        {
            "model": "llama3.2",
            "stream": True,
            "keep_alive": "10m",
            "format": "json",
            "messages": [{"role": "user", "content": "capital of France?"}],
        }
    ]


def test_run_reads_the_prompt_from_stdin_before_the_arguments(server):
    server.route("POST", "/api/chat", content=answer("ok"))
    schema = '{"type": "object"}'
    result = corral("run", "m", "Summarize.", "--format", schema, input="A long text.\n")
    assert result.exit_code == 0, result.output
    body = server.bodies("/api/chat")[0]
    assert body["messages"] == [{"role": "user", "content": "A long text.\n Summarize."}]
    assert body["format"] == {"type": "object"}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--keepalive", "soon"], "--keepalive: 'soon' is not a duration"),
        (["--format", "yaml"], "--format takes json or a JSON schema"),
        ([], "the prompt is empty"),
    ],
)
def test_run_refuses_bad_options(server, args, words):
    result = corral("run", "m", *args, input="")
    assert result.exit_code == 2
    assert words in result.stderr
    assert server.seen == []


def test_run_with_a_model_that_is_not_there(server):
    server.route("POST", "/api/chat", 404, json={"error": "model 'nope:latest' not found"})
    result = corral("run", "nope", "hi")
    assert result.exit_code == 1
    assert "error: model 'nope:latest' not found" in result.stderr


@pytest.fixture
def tty(monkeypatch):
    """Make ``run`` believe stdin is a terminal, so it chats instead of reading a prompt."""
    monkeypatch.setattr(cli_chat, "stdin_is_tty", lambda: True)


def chat_replies(server: FakeCorral, *replies: bytes | Callable[[], Iterator[bytes]]) -> None:
    """Answer successive /api/chat requests with ``replies`` (bytes, or a stream function)."""
    queue = list(replies)

    def reply(request):
        content = queue.pop(0)
        return httpx.Response(200, content=content if isinstance(content, bytes) else content())

    server.routes["POST", "/api/chat"] = reply


def test_an_interactive_chat_keeps_history_until_clear(server, tty):
    server.route("POST", "/api/generate", json={"done": True, "done_reason": "load"})
    chat_replies(server, answer("Hi", "!"), answer("Bob."), answer("Who?"))
    typed = "hello\n/?\nmy name?\n\n/clear\nand now?\n/bye\nnever sent\n"
    result = corral("run", "llama3.2", "--keepalive", "1h", input=typed)
    assert result.exit_code == 0, result.output
    assert server.paths()[0] == "POST /api/generate"
    assert server.bodies("/api/generate") == [
        {"model": "llama3.2", "keep_alive": "1h", "stream": False}
    ]
    history = [body["messages"] for body in server.bodies("/api/chat")]
    assert history == [
        [{"role": "user", "content": "hello"}],
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "my name?"},
        ],
        [{"role": "user", "content": "and now?"}],  # /clear forgot the rest
    ]
    assert ">>> Hi!\n\n>>> Available commands:" in result.stdout
    assert "Cleared session context" in result.stdout
    assert "Who?" in result.stdout


def test_an_interactive_chat_ends_at_eof_and_takes_multiline_messages(server, tty):
    server.route("POST", "/api/generate", json={"done": True})
    chat_replies(server, answer("Fine."))
    result = corral("run", "m", input='"""first line\nsecond line\n"""\n/nope\n')
    assert result.exit_code == 0, result.output
    assert server.bodies("/api/chat")[0]["messages"] == [
        {"role": "user", "content": "first line\nsecond line\n"}
    ]
    assert "... ... " in result.stdout
    assert "Unknown command '/nope'. Type /? for help" in result.stdout


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(server, tty):
    server.route("POST", "/api/generate", json={"done": True})

    def interrupted() -> Iterator[bytes]:
        yield ndjson({"message": {"role": "assistant", "content": "Once upon"}, "done": False})
        raise KeyboardInterrupt  # what Ctrl-C raises while the answer streams

    chat_replies(server, interrupted, answer("Sure."))
    result = corral("run", "m", input="tell a story\nsomething short\n/bye\n")
    assert result.exit_code == 0, result.output
    assert "Once upon" in result.stdout
    assert server.bodies("/api/chat")[1]["messages"] == [
        {"role": "user", "content": "something short"}  # the stopped turn is forgotten
    ]


def test_a_server_error_during_a_chat_is_shown_and_the_chat_goes_on(server, tty):
    server.route("POST", "/api/generate", json={"done": True})
    chat_replies(server, ndjson({"error": "all replicas are busy"}), answer("Ok."))
    result = corral("run", "m", input="one\ntwo\n/bye\n")
    assert result.exit_code == 0, result.output
    assert "error: all replicas are busy" in result.stderr
    assert server.bodies("/api/chat")[1]["messages"] == [{"role": "user", "content": "two"}]
    assert "Ok." in result.stdout


def test_an_interactive_chat_with_a_missing_model_fails_before_the_prompt(server, tty):
    server.route("POST", "/api/generate", 404, json={"error": "model 'nope:latest' not found"})
    result = corral("run", "nope", input="hello\n")
    assert result.exit_code == 1
    assert "model 'nope:latest' not found" in result.stderr
    assert ">>>" not in result.stdout
