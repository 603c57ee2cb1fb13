"""Pulls: how models arrive in the store, and how a node fetches one from the head.

``Puller.pull(name)`` takes a model from one of four sources (``source_of``):

- an Ollama (OCI) registry, by name: ``llama3.2:1b`` is
  ``registry.ollama.ai/library/llama3.2:1b`` (``oci``);
- ``hf.co/<org>/<repo>[:<quant>]``: the repository's files are listed with their sha256
  (``hf``); ``choose_gguf`` picks the one of the quantization asked for (``Q4_K_M`` by
  default, else the only one), which downloads like a registry blob (verified by that
  sha256) and becomes ``hf.co/org/repo:quant``. A repository that holds a vision
  projector (an ``mmproj`` GGUF) gets it pulled too (``choose_projector``), as the
  model's projector layer;
- an ``http(s)`` URL of a ``.gguf`` file: downloaded, checked to be GGUF, hashed, and
  named after the file (``<stem>:latest``);
- a local ``.gguf`` path: copied into the store, named the same way.

Every download is ranged and resumable (``transfer``). Only a file whose sha256 is the
digest it was asked for is renamed into the store (``Store.commit_partial``): a
mismatch fails the pull (``PullFailed``), the bad file is removed, and no manifest is
written. Blobs the store has are not fetched again; their progress shows them complete.

Two callers pulling the same name share ONE download: the first starts it as a task,
each caller follows its own queue of progress objects (joining late, it first gets where
each layer stands now), and a caller that stops listening leaves the download running
for the others. Two pulls that need the same blob (two tags of one model) share that
blob's download too (``puller``).

Progress objects are Ollama's (``progress``): ``{"status": "pulling manifest"}``, then
for each blob ``{"status": "pulling <12 hex>", "digest", "total", "completed"}`` (at
most ten a second per blob, the last one complete), ``{"status": "verifying sha256
digest"}``, ``{"status": "writing manifest"}`` and ``{"status": "success"}``.

``Puller.fetch_blob(digest, url)`` is the same download for a node that lacks a model's
file: from the head's ``/api/blobs/<digest>``, resumable, verified.

| module | owns |
| --- | --- |
| ``names`` | sources, local names, which GGUF and projector a tag picks |
| ``oci`` | the registry v2 client: manifest, blobs, the Bearer login |
| ``hf`` | Hugging Face: a repository's files and their URLs |
| ``transfer`` | the ranged, resumable download of one file |
| ``progress`` | progress objects, and sharing them between callers |
| ``puller`` | ``Puller``: one pull per name, one download per blob |
"""

from __future__ import annotations

from nodes.pull.names import (
    DEFAULT_QUANT,
    HF_HOSTS,
    Source,
    choose_gguf,
    choose_projector,
    local_name,
    source_of,
)
from nodes.pull.oci import RegistryClient, parse_challenge
from nodes.pull.puller import Puller

__all__ = [
    "DEFAULT_QUANT",
    "HF_HOSTS",
    "Puller",
    "RegistryClient",
    "Source",
    "choose_gguf",
    "choose_projector",
    "local_name",
    "parse_challenge",
    "source_of",
]
