"""Find a model's file on the node that must run it.

The head plans with paths on its own disk. A replica on another node takes, in
order:

1. the same path, when it exists here: the same box, or storage every node
   mounts at the same place (NFS, a shared ``CORRAL_MODELS``), used in place;
2. the blob in this node's own store (``CORRAL_MODELS``, else
   ``~/.corral/models``), fetched before;
3. the blob fetched from the head's ``/api/blobs/sha256:<hex>`` into this
   node's store: resumable and checked against its digest, so a node never
   reaches the internet for a model the head already has.

A vision model's projector (``EngineSpec.projector``) is found the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from pathlib import Path

from nodes.engine import EngineSpec
from nodes.errors import CorralError, ModelLoadFailed
from nodes.rayenv import node_api_key
from nodes.store import Store

log = logging.getLogger("corral.locate")

DEFAULT_STORE = "~/.corral/models"


def node_store() -> Store:
    """This node's model store (``CORRAL_MODELS``, else ``~/.corral/models``)."""
    return Store(Path(os.environ.get("CORRAL_MODELS") or DEFAULT_STORE).expanduser())


async def locate(spec: EngineSpec, store: Store | None = None) -> EngineSpec:
    """``spec`` with a ``path`` (and ``projector``) that exist on this node (see module
    docstring)."""
    if spec.engine != "llama.cpp":
        return spec
    path = await _locate_file(spec, spec.path, spec.digest, "model file", store)
    projector = spec.projector
    if projector:
        digest = spec.projector_digest
        projector = await _locate_file(spec, projector, digest, "projector", store)
    return replace(spec, path=path, projector=projector)


async def _locate_file(
    spec: EngineSpec, path: str, digest: str, what: str, store: Store | None
) -> str:
    if await asyncio.to_thread(Path(path).is_file):
        return path
    if not digest:
        raise ModelLoadFailed(
            f"The {what} {path} is not on this node, and the head gave no digest to "
            f"fetch it by. Put the models on storage every node mounts at the same path."
        )
    store = store or node_store()
    if store.has_blob(digest):
        return str(store.blob_path(digest))
    if not spec.fetch_from:
        raise ModelLoadFailed(f"The {what} {path} is not on this node.")
    url = f"{spec.fetch_from}/api/blobs/{digest}"
    log.info("fetching %s (%s) from %s into %s", spec.model, digest, url, store.root)
    from nodes.pull import Puller  # only a node that fetches pays for the import

    try:
        key = node_api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else None
        fetched = await Puller(store).fetch_blob(digest, url, headers=headers)
    except CorralError as exc:
        raise ModelLoadFailed(
            f"{spec.model} is not on this node and fetching it from the head failed: "
            f"{exc.message} (the head's API must be reachable from every node: serve it on "
            f"0.0.0.0, or put the models on shared storage)"
        ) from None
    return str(fetched)
