"""``corral pull|list|show|rm|cp|create|stop|run``: the model library, the way ``ollama`` does it.

Each command talks to a running Corral over its Ollama HTTP API (``/api/pull``,
``/api/tags``, ``/api/show``, ``/api/chat``, ...), so it works from any box that
can reach the API, without Ray and without the model files. The HTTP steps are
small functions taking an ``httpx.Client``; what can be worked out without a
server (the Modelfile, sizes, ages, progress lines) is in pure functions.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from cluster.cli import ConfigOption, app, fail, load
from nodes.durations import parse_duration
from nodes.models import normalize_name

HostOption = Annotated[
    str | None, typer.Option(help="The Corral API to ask, HOST:PORT (default: settings' host).")
]
# Pulls, uploads, loads and answers may take minutes between two bytes; only connecting may not.
LONG = httpx.Timeout(None, connect=10.0)
CHUNK = 1024 * 1024


class ServerError(Exception):
    """What Corral answered instead of doing it: its ``{"error": ...}`` text."""


def connect(url: str) -> httpx.Client:
    """The client every command uses (tests replace it with one on a mock transport);
    it sends the API key of ``CORRAL_API_KEY`` when that is set."""
    from cluster.cli_ps import api_headers

    return httpx.Client(
        base_url=url, headers=api_headers(), timeout=httpx.Timeout(60.0, connect=10.0)
    )


@contextmanager
def corral(host: str | None, config: Path | None) -> Iterator[httpx.Client]:
    """A client for the API the settings name; its failures exit 1 saying what went wrong."""
    # Imported here: cluster.cli imports this module and cli_ps, which imports cluster.cli.
    from cluster.cli_ps import api_url

    url = api_url(load(config, host=host).host)
    try:
        with connect(url) as client:
            yield client
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise fail(f"cannot reach Corral at {url} ({exc}); is `corral serve` running?") from None
    except httpx.TransportError as exc:
        reason = str(exc) or type(exc).__name__
        raise fail(f"lost the connection to Corral at {url} ({reason})") from None
    except ServerError as exc:
        raise fail(exc) from None


# -- HTTP ---------------------------------------------------------------------


def error_text(response: httpx.Response) -> str:
    """The ``error`` of an Ollama error body, else the status and the start of the body;
    a refused key adds how to give one."""
    from cluster.cli_ps import NEED_KEY

    try:
        text = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        text = f"HTTP {response.status_code}: {response.text[:200]}"
    return f"{text.rstrip('.')}; {NEED_KEY}" if response.status_code == 401 else text


def call(client: httpx.Client, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
    """One request (with ``body`` as JSON); the JSON reply ({} when empty) or ``ServerError``."""
    response = client.request(method, path, json=body)
    if response.is_error:
        raise ServerError(error_text(response))
    return response.json() if response.content else {}


def ndjson(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The objects of a streamed reply; an error status or ``{"error": ...}`` is ``ServerError``."""
    if response.is_error:
        response.read()
        raise ServerError(error_text(response))
    for line in response.iter_lines():
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except ValueError:
            raise ServerError(f"Corral sent a line that is not JSON: {line[:200]!r}") from None
        if "error" in message:
            raise ServerError(str(message["error"]))
        yield message


def follow(client: httpx.Client, path: str, body: dict[str, Any], view: ProgressView) -> None:
    """Stream Ollama progress objects from ``path`` into ``view`` until ``success``."""
    status = ""
    with client.stream("POST", path, json={**body, "stream": True}, timeout=LONG) as response:
        for message in ndjson(response):
            view.show(progress_row(message))
            status = message.get("status", "")
    if status != "success":
        raise ServerError("the server closed the stream before it finished; try again")


def file_digest(path: Path, view: ProgressView) -> str:
    """``sha256:<hex>`` of the file, with a bar while it is read."""
    total, done, sha = path.stat().st_size, 0, hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            sha.update(chunk)
            done += len(chunk)
            view.show(Row(f"hash:{path}", f"hashing {path.name}", total, done))
    return f"sha256:{sha.hexdigest()}"


def upload_blob(client: httpx.Client, path: Path, view: ProgressView) -> str:
    """Make ``path`` a blob on the server (as ``ollama create`` does); its digest."""
    digest = file_digest(path, view)
    present = client.head(f"/api/blobs/{digest}")
    if present.status_code == 200:
        view.show(Row(digest, f"using the server's copy of {short_digest(digest)}"))
        return digest
    if present.status_code != 404:
        raise ServerError(error_text(present))
    total = path.stat().st_size
    label = f"uploading {short_digest(digest)}"

    def chunks() -> Iterator[bytes]:
        done = 0
        with path.open("rb") as file:
            while chunk := file.read(CHUNK):
                yield chunk
                done += len(chunk)
                view.show(Row(digest, label, total, done))

    view.show(Row(digest, label, total, 0))
    response = client.post(
        f"/api/blobs/{digest}",
        content=chunks(),
        headers={"Content-Length": str(total)},
        timeout=LONG,
    )
    if response.is_error:
        raise ServerError(error_text(response))
    return digest


def chat(client: httpx.Client, request: dict[str, Any], write: Callable[[str], None]) -> str:
    """Stream one answer from ``/api/chat`` through ``write``; the whole answer.

    A KeyboardInterrupt while it streams leaves the ``with`` and so closes the stream.
    """
    parts = []
    with client.stream("POST", "/api/chat", json=request, timeout=LONG) as response:
        for message in ndjson(response):
            text = message.get("message", {}).get("content", "")
            if text:
                write(text)
                parts.append(text)
    return "".join(parts)


def loaded_models(client: httpx.Client) -> set[str]:
    """The names ``/api/ps`` lists, normalized (``x`` is ``x:latest``)."""
    models = call(client, "GET", "/api/ps")["models"]
    return {normalize_name(m.get("name") or m["model"]) for m in models}


# -- progress -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of progress: a bar when ``total`` is known, else a status line."""

    key: str
    label: str
    total: int | None = None
    completed: int = 0


def short_digest(digest: str) -> str:
    """``sha256:0123456789abcdef...`` -> ``0123456789ab``, as Ollama names layers."""
    return digest.removeprefix("sha256:")[:12]


def progress_row(message: dict[str, Any]) -> Row:
    """The line an Ollama progress object updates: its layer's bar, or its status line."""
    status = message.get("status", "")
    digest = message.get("digest")
    if digest and message.get("total"):
        verb = status.split()[0] if status else "pulling"
        label = f"{verb} {short_digest(digest)}"
        return Row(digest, label, int(message["total"]), int(message.get("completed") or 0))
    return Row(status, status)


class _OnBars(ProgressColumn):
    """Shows ``column`` on bar rows only, so status lines stay plain text."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Task) -> Any:
        return self.column.render(task) if task.fields["bar"] else Text("")


class ProgressView:
    """Progress lines on stderr in the order they first came, as ``ollama pull`` draws them."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            _OnBars(BarColumn()),
            _OnBars(DownloadColumn()),
            _OnBars(TransferSpeedColumn()),
            _OnBars(TimeRemainingColumn()),
            console=Console(stderr=True),
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, row: Row) -> None:
        task = self.tasks.get(row.key)
        if task is None:
            self.tasks[row.key] = self.progress.add_task(
                row.label, total=row.total, completed=row.completed, bar=row.total is not None
            )
        else:
            self.progress.update(task, total=row.total, completed=row.completed)


# -- words for sizes and times ----------------------------------------------------


def human_size(n: int) -> str:
    """``4.7 GB``, ``135 MB``: decimal units as ``ollama list`` prints them."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            value = n / scale
            if value < 10 and value != int(value):
                return f"{value:.1f} {unit}"
            return f"{int(value)} {unit}"
    return f"{n} B"


def human_age(seconds: float) -> str:
    """``3 days ago``, ``About an hour ago``: how long ago, as ``ollama list`` says it."""
    s = max(0, int(seconds))
    minutes, hours = s // 60, round(seconds / 3600)
    if s < 1:
        words = "Less than a second"
    elif s < 60:
        words = "1 second" if s == 1 else f"{s} seconds"
    elif minutes < 60:
        words = "About a minute" if minutes == 1 else f"{minutes} minutes"
    elif hours == 1:
        words = "About an hour"
    elif hours < 48:
        words = f"{hours} hours"
    elif hours < 24 * 14:
        words = f"{hours // 24} days"
    elif hours < 24 * 60:
        words = f"{hours // (24 * 7)} weeks"
    elif hours < 24 * 365 * 2:
        words = f"{hours // (24 * 30)} months"
    else:
        words = f"{hours // (24 * 365)} years"
    return f"{words} ago"


def modified(text: str | None, now: datetime) -> str:
    """``modified_at`` (RFC 3339, even with nanoseconds) as an age; ``Never`` when absent."""
    if not text:
        return "Never"
    return human_age((now - datetime.fromisoformat(text)).total_seconds())


# -- the Modelfile ------------------------------------------------------------------


class ModelfileError(ValueError):
    """A Modelfile that cannot be used, and on which line (0: the file as a whole)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Modelfile:
    """What a Modelfile asks for, as ``/api/create`` fields."""

    source: str  # FROM: a GGUF path (relative to the Modelfile's folder) or a model name
    parameters: dict[str, Any] = field(default_factory=dict)
    # A second FROM, as Ollama takes a vision model: the projector's GGUF file (the server
    # tells the model from the projector by their headers, so the order does not matter).
    projector: str | None = None
    template: str | None = None
    system: str | None = None
    license: str | None = None


_INSTRUCTIONS = "FROM, PARAMETER, TEMPLATE, SYSTEM or LICENSE"
_UNSUPPORTED = {"adapter", "draft", "message", "parser", "renderer", "requires"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+")


def parse_modelfile(text: str) -> Modelfile:
    """The instructions of an Ollama Modelfile; ``ModelfileError`` names the bad line."""
    lines = text.removeprefix("\ufeff").splitlines()
    values: dict[str, Any] = {"parameters": {}}
    licenses: list[str] = []
    from_line = 0
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.replace("\t", " ").partition(" ")
        instruction = word.lower()
        if instruction in _UNSUPPORTED:
            raise ModelfileError(number, f"{word.upper()} is not supported by Corral")
        if instruction not in ("from", "parameter", "template", "system", "license"):
            raise ModelfileError(number, f"unknown instruction {word!r}: use {_INSTRUCTIONS}")
        rest = rest.strip()
        if rest.startswith('"""'):
            value, i = _triple_quoted(rest[3:], lines, i, number)
        else:
            value = _unquote(rest, number)
        if not value and instruction in ("from", "parameter"):
            raise ModelfileError(number, f"{word.upper()} needs a value")
        if instruction == "from":
            if "projector" in values:
                raise ModelfileError(
                    number, "a third FROM: give a model and at most one projector (mmproj)"
                )
            if from_line:
                values["projector"] = value
            else:
                values["source"], from_line = value, number
        elif instruction == "parameter":
            name, value = _parameter(rest, number)
            if name == "stop":
                values["parameters"].setdefault("stop", []).append(value)
            else:
                values["parameters"][name] = value
        elif instruction == "license":
            licenses.append(value)
        else:
            values[instruction] = value
    if not from_line:
        raise ModelfileError(0, "no FROM line: start with FROM ./model.gguf or FROM <model name>")
    if licenses:
        values["license"] = "\n\n".join(licenses)
    return Modelfile(**values)


def _triple_quoted(start: str, lines: list[str], i: int, number: int) -> tuple[str, int]:
    """The text up to the closing ``\"\"\"`` (kept verbatim) and the index of the next line."""
    body = start
    while '"""' not in body:
        if i >= len(lines):
            raise ModelfileError(number, 'the """ opened here is never closed')
        body += "\n" + lines[i]
        i += 1
    value, _, after = body.partition('"""')
    if after.strip():
        raise ModelfileError(i, f'unexpected text after the closing """: {after.strip()!r}')
    return value, i


def _unquote(text: str, number: int) -> str:
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise ModelfileError(number, f"the quote in {text!r} is never closed")
        return text[1:-1]
    return text


def _parameter(rest: str, number: int) -> tuple[str, Any]:
    """``PARAMETER name value``: the name and the value (a number or bool when it is one;
    a ``stop`` sequence stays text)."""
    name, _, value = rest.partition(" ")
    value = _unquote(value.strip(), number)
    if not _PARAMETER_NAME.fullmatch(name) or not value:
        raise ModelfileError(number, "PARAMETER needs a name and a value, like: PARAMETER top_k 20")
    if name == "stop":
        return name, value
    if _NUMBER.fullmatch(value):
        return name, float(value) if re.search(r"[.eE]", value) else int(value)
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    return name, value


def model_file(source: str, folder: Path) -> Path | None:
    """The GGUF file FROM names (``~`` expanded, relative to ``folder``), None for a model name."""
    path = folder / Path(source).expanduser()
    if path.is_dir():
        raise ModelfileError(0, f"FROM {source}: {path} is a folder, not a GGUF file")
    if path.is_file():
        return path
    if source.startswith(("/", "./", "../", "~")) or source.lower().endswith(".gguf"):
        raise ModelfileError(0, f"FROM {source}: there is no file {path}")
    return None


def is_gguf(path: Path) -> bool:
    """A GGUF file rather than a Modelfile: by its name, or by its first four bytes."""
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as file:
        return file.read(4) == b"GGUF"


def create_body(name: str, file: Path, client: httpx.Client, view: ProgressView) -> dict:
    """The ``/api/create`` request for ``file`` (a GGUF or a Modelfile), uploading its GGUF."""
    if is_gguf(file):
        return {"model": name, "files": {file.name: upload_blob(client, file, view)}}
    try:
        modelfile = parse_modelfile(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelfileError(0, "neither a GGUF file nor a Modelfile (not UTF-8 text)") from None
    body: dict[str, Any] = {"model": name}
    files: dict[str, str] = {}
    gguf = model_file(modelfile.source, file.parent)
    if gguf is None:
        body["from"] = modelfile.source
    else:
        files[gguf.name] = upload_blob(client, gguf, view)
    if modelfile.projector is not None:
        projector = model_file(modelfile.projector, file.parent)
        if projector is None:
            raise ModelfileError(
                0, f"FROM {modelfile.projector}: a second FROM must be a projector's GGUF file"
            )
        key = projector.name if projector.name not in files else f"projector-{projector.name}"
        files[key] = upload_blob(client, projector, view)
    if files:
        body["files"] = files
    for key in ("template", "system", "license", "parameters"):
        if getattr(modelfile, key):
            body[key] = getattr(modelfile, key)
    return body


# -- show ----------------------------------------------------------------------------


def show_summary(info: dict[str, Any]) -> str:
    """``ollama show``'s summary: the model, its capabilities, parameters, system, license."""
    details, meta = info.get("details") or {}, info.get("model_info") or {}
    arch = meta.get("general.architecture") or details.get("family", "")
    count = meta.get("general.parameter_count")
    model = [
        ("architecture", arch),
        ("parameters", details.get("parameter_size") or (count and _count(count))),
        ("context length", meta.get(f"{arch}.context_length")),
        ("embedding length", meta.get(f"{arch}.embedding_length")),
        ("quantization", details.get("quantization_level")),
    ]
    sections = {
        "Model": [(key, str(value)) for key, value in model if value],
        "Capabilities": [(c, "") for c in info.get("capabilities") or ()],
        "Parameters": [_split(line) for line in (info.get("parameters") or "").splitlines()],
        "System": _head(info.get("system")),
        "License": _head(info.get("license")),
    }
    out = []
    for title, rows in sections.items():
        rows = [(key, value) for key, value in rows if key]
        if not rows:
            continue
        width = max(len(key) for key, _ in rows)
        out.append(f"  {title}")
        out += [f"    {key:<{width}}    {value}".rstrip() for key, value in rows]
        out.append("")
    return "\n".join(out)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0", "")
    return str(n)


def _split(line: str) -> tuple[str, str]:
    key, _, value = line.strip().partition(" ")
    return key, value.strip()


def _head(text: str | None, lines: int = 2) -> list[tuple[str, str]]:
    """The first non-blank lines of ``text``, then ``...`` if there is more."""
    kept = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return [(line, "") for line in kept[:lines]] + ([("...", "")] if len(kept) > lines else [])


# -- commands ------------------------------------------------------------------------


@app.command()
def pull(
    model: Annotated[str, typer.Argument(help="llama3.2:1b, host/namespace/model:tag, hf.co/...")],
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow plain HTTP to the registry.")
    ] = False,
    host: HostOption = None,
    config: ConfigOption = None,
) -> None:
    """Download a model from a registry, Hugging Face or a URL into Corral's store."""
    with corral(host, config) as client, ProgressView() as view:
        follow(client, "/api/pull", {"model": model, "insecure": insecure}, view)


def list_models(host: HostOption = None, config: ConfigOption = None) -> None:
    """Models Corral has: name, ID, size, last change."""
    with corral(host, config) as client:
        models = call(client, "GET", "/api/tags").get("models", [])
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "ID", "SIZE", "MODIFIED"):
        table.add_column(column)
    now = datetime.now(UTC)
    for m in models:
        age = modified(m.get("modified_at"), now)
        table.add_row(m["name"], short_digest(m["digest"]), human_size(m["size"]), age)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


app.command("list")(list_models)
app.command("ls", hidden=True)(list_models)


@app.command()
def show(
    model: Annotated[str, typer.Argument(help="The model to describe.")],
    modelfile: Annotated[bool, typer.Option("--modelfile", help="Print its Modelfile.")] = False,
    parameters: Annotated[
        bool, typer.Option("--parameters", help="Print its default parameters.")
    ] = False,
    template: Annotated[bool, typer.Option("--template", help="Print its template.")] = False,
    system: Annotated[bool, typer.Option("--system", help="Print its system prompt.")] = False,
    license: Annotated[bool, typer.Option("--license", help="Print its license.")] = False,
    host: HostOption = None,
    config: ConfigOption = None,
) -> None:
    """Describe a model: architecture, size, context, capabilities, parameters, license."""
    chosen = [
        name
        for name, on in (
            ("modelfile", modelfile),
            ("parameters", parameters),
            ("template", template),
            ("system", system),
            ("license", license),
        )
        if on
    ]
    if len(chosen) > 1:
        raise fail("give only one of --modelfile, --parameters, --template, --system, --license", 2)
    with corral(host, config) as client:
        info = call(client, "POST", "/api/show", {"model": model})
    if chosen:
        text = info.get(chosen[0]) or ""
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        print(show_summary(info))


@app.command("rm")
def remove(
    models: Annotated[list[str], typer.Argument(help="The models to delete.")],
    host: HostOption = None,
    config: ConfigOption = None,
) -> None:
    """Delete models (and the files no other model uses)."""
    failed = []
    with corral(host, config) as client:
        for model in models:
            try:
                call(client, "DELETE", "/api/delete", {"model": model})
            except ServerError as exc:
                Console(stderr=True).print(f"[red]error:[/] {exc}", highlight=False)
                failed.append(model)
            else:
                print(f"deleted '{model}'")
    if failed:
        raise typer.Exit(1)


@app.command("cp")
def copy(
    source: Annotated[str, typer.Argument(help="The model to copy.")],
    destination: Annotated[str, typer.Argument(help="Its new name.")],
    host: HostOption = None,
    config: ConfigOption = None,
) -> None:
    """Give a model another name (no file is copied)."""
    with corral(host, config) as client:
        call(client, "POST", "/api/copy", {"source": source, "destination": destination})
    print(f"copied '{source}' to '{destination}'")


@app.command()
def create(
    model: Annotated[str, typer.Argument(help="The new model's name.")],
    file: Annotated[
        Path,
        typer.Option("--file", "-f", help="A Modelfile, or a GGUF file to serve as it is."),
    ] = Path("Modelfile"),
    host: HostOption = None,
    config: ConfigOption = None,
) -> None:
    """Create a model from a GGUF file or a Modelfile (FROM, PARAMETER, TEMPLATE, SYSTEM...)."""
    if not file.is_file():
        raise fail(f"there is no file {file}; give a Modelfile or a .gguf with -f")
    with corral(host, config) as client, ProgressView() as view:
        try:
            body = create_body(model, file, client, view)
        except ModelfileError as exc:
            where = f"{file}:{exc.line}" if exc.line else str(file)
            raise fail(f"{where}: {exc}") from None
        follow(client, "/api/create", body, view)


@app.command()
def stop(
    model: Annotated[str, typer.Argument(help="The model to unload.")],
    host: HostOption = None,
    config: ConfigOption = None,
) -> None:
    """Unload a model from every node now (keep_alive 0)."""
    with corral(host, config) as client:
        was_loaded = normalize_name(model) in loaded_models(client)
        call(client, "POST", "/api/generate", {"model": model, "keep_alive": 0, "stream": False})
    print(f"stopped '{model}'" if was_loaded else f"'{model}' was not loaded")


def stdin_is_tty() -> bool:
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


HELP = """Available commands:
  /clear          Forget the conversation so far
  /bye            Exit (or Ctrl-D)
  /?, /help       This help

Use \"\"\" to begin a multi-line message, and \"\"\" again to end it.
Ctrl-C stops an answer.
"""


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
        import readline  # noqa: F401  (line editing and history for input())
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
