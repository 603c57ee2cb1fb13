"""``corral pull|list|show|rm|cp|create|stop``: the model library, the way ``ollama`` does it.

Each command asks a running Corral over its API (``cluster/api_client.py``), so
it works from any box that can reach it. What can be worked out without a
server is in pure functions: the ``/api/create`` request a Modelfile makes
(``cluster/modelfile.py`` reads it), and ``ollama show``'s summary. ``corral
run`` and its chat are in ``cluster/cli_chat.py``.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from cluster.api_client import ServerError, call, follow, loaded_models, upload_blob
from cluster.cli_app import ConfigOption, HostOption, app, corral, fail
from cluster.modelfile import ModelfileError, is_gguf, model_file, parse_modelfile
from cluster.progress_view import ProgressView, human_size, modified, short_digest
from nodes.models import normalize_name


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
