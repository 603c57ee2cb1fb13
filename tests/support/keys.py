"""API keys on the session's Corral for a while, as ``corral keys create`` makes them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx

from deployments.keys import KeyFile, keys_path


@contextlib.contextmanager
def keys_on(corral) -> Iterator[KeyFile]:
    """The key file of ``corral``'s state directory, to create keys in; when the block
    ends the file is removed, which opens the API again for the other tests."""
    path = keys_path(corral.settings.state_path)
    try:
        yield KeyFile(path)
    finally:
        for leftover in (path, path.with_name(path.name + ".lock")):
            leftover.unlink(missing_ok=True)
        assert httpx.get(f"{corral.url}/api/tags").status_code == 200  # open again
