"""Names: where ``pull(name)`` takes a model from, the name it stores it under, and which
files of a Hugging Face repository a tag picks (the model's GGUF and its projector).

Pure functions of strings: no network, no disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Literal

import httpx

from nodes.errors import InvalidRequest
from nodes.store import ModelRef

HF_HOSTS = ("hf.co", "huggingface.co")
DEFAULT_QUANT = "Q4_K_M"

Source = Literal["registry", "hf", "url", "file"]

_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
# The precision of a projector to pull when a repository has several, best first (the
# projector is small beside the model; llama.cpp's own conversions ship F16).
_PROJECTOR_PREFERENCE = ("f16", "bf16", "f32", "q8_0")


def source_of(name: str) -> Source:
    """Where ``pull(name)`` takes the model from (see ``nodes.pull``)."""
    text = name.strip()
    lower = text.lower()
    if lower.startswith(("http://", "https://")):
        return "url"
    if lower.endswith(".gguf") or text.startswith(("/", "./", "../", "~")):
        return "file"
    if lower.split("/", 1)[0] in HF_HOSTS:
        return "hf"
    return "registry"


def local_name(name: str) -> str:
    """The name ``pull(name)`` stores the model under; InvalidRequest for a bad one."""
    source = source_of(name)
    if source == "registry":
        return ModelRef.parse(name).display
    if source == "hf":
        ref = ModelRef.parse(name.lower())
        return ModelRef(HF_HOSTS[0], ref.namespace, ref.model, ref.tag).display
    text = name.strip()
    filename = Path(text).name
    if source == "url":
        try:
            url = httpx.URL(text)
        except httpx.InvalidURL as exc:
            raise InvalidRequest(f"{text!r} is not a URL: {exc}.") from None
        if not url.host:
            raise InvalidRequest(f"{text!r} is not a URL: it names no host.")
        filename = PurePosixPath(url.path).name  # percent-decoded
    if not filename.lower().endswith(".gguf"):
        raise InvalidRequest(
            f"{text!r} does not name a .gguf file; pull a model name, hf.co/org/repo, or the "
            f"URL or path of a .gguf file."
        )
    stem = re.sub(r"[^a-z0-9_.-]+", "-", filename[: -len(".gguf")].lower())
    stem = re.sub(r"\.{2,}", ".", stem).strip("-.")
    if not stem:
        raise InvalidRequest(f"Cannot make a model name out of {filename!r}; rename the file.")
    return ModelRef.parse(f"{stem}:latest").display


def choose_gguf(files: Iterable[str], quant: str | None, repo: str) -> str:
    """The file of ``repo`` to pull for ``quant`` (``Q4_K_M`` when None, else the only one)."""
    ggufs = sorted(
        (f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()),
        key=lambda f: (f.count("/"), len(f), f),
    )
    if not ggufs:
        raise InvalidRequest(f"hf.co/{repo} has no GGUF file to pull.")

    def matching(q: str) -> list[str]:
        pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(q)}(?![A-Za-z0-9_])", re.IGNORECASE)
        return [f for f in ggufs if pattern.search(PurePosixPath(f).name)]

    if quant:
        matches = matching(quant)
    else:
        matches = matching(DEFAULT_QUANT) or (ggufs if len(ggufs) == 1 else [])
    whole = [f for f in matches if not _SPLIT.search(f)]
    if whole:
        return whole[0]
    if matches:
        raise InvalidRequest(
            f"hf.co/{repo} has {quant or DEFAULT_QUANT} only split into several files, which "
            f"Corral cannot pull; choose another quantization."
        )
    tags = sorted({_quant_of(f) for f in ggufs if not _SPLIT.search(f)})
    wanted = f"no {quant} file" if quant else f"several GGUF files and no {DEFAULT_QUANT}"
    raise InvalidRequest(
        f"hf.co/{repo} has {wanted}; add one of these tags: {', '.join(tags) or '(none)'}."
    )


def choose_projector(files: Iterable[str], model_file: str) -> str | None:
    """The vision projector (``mmproj`` GGUF) of a repository for ``model_file``, if any:
    one in the model's folder first, then F16, BF16, F32, Q8_0, then the first by name."""
    folder = str(PurePosixPath(model_file).parent)
    projectors = [
        f
        for f in files
        if f.lower().endswith(".gguf") and "mmproj" in PurePosixPath(f).name.lower()
    ]
    if not projectors:
        return None

    def rank(f: str) -> tuple:
        parts = re.split(r"[-.]", PurePosixPath(f).name[: -len(".gguf")].lower())
        precision = next(
            (i for i, q in enumerate(_PROJECTOR_PREFERENCE) if q in parts),
            len(_PROJECTOR_PREFERENCE),
        )
        return str(PurePosixPath(f).parent) != folder, precision, f

    return min(projectors, key=rank)


def _quant_of(filename: str) -> str:
    """``Q4_K_M`` out of ``Llama-3.2-1B-Instruct-Q4_K_M.gguf`` (the last ``-``/``.`` part)."""
    return re.split(r"[-.]", PurePosixPath(filename).name[: -len(".gguf")])[-1]
