"""Hugging Face without a network: a repository's files come with their sha256, and
the Hub's refusals become errors that say what to do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nodes.errors import ModelNotFound, PullFailed
from nodes.pull.hf import list_files


def test_hugging_face_files_come_with_their_sha256(monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    siblings = [
        RepoSibling("README.md", size=1200),
        RepoSibling(
            "m-Q4_K_M.gguf", size=134, lfs=BlobLfsInfo(size=800, sha256="a" * 64, pointer_size=134)
        ),
    ]
    failure: list[Exception] = []

    class FakeApi:
        def model_info(self, repo_id, *, files_metadata=False):
            assert files_metadata
            if failure:
                raise failure[0]
            return SimpleNamespace(siblings=siblings, sha="0123abc")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert list_files("org/repo", "hf.co/org/repo") == (
        {"README.md": (1200, None), "m-Q4_K_M.gguf": (800, "a" * 64)},
        "0123abc",
    )
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co"))
    failure[:] = [RepositoryNotFoundError("no such repo", response=response)]
    with pytest.raises(ModelNotFound):
        list_files("org/repo", "hf.co/org/repo")
    failure[:] = [GatedRepoError("gated", response=response)]
    with pytest.raises(PullFailed, match="accept its terms"):
        list_files("org/repo", "hf.co/org/repo")
    failure[:] = [httpx.ConnectError("no network")]
    with pytest.raises(PullFailed, match="Asking Hugging Face about org/repo failed"):
        list_files("org/repo", "hf.co/org/repo")
