"""Hugging Face: a model repository's files with their sha256, and where to fetch one.

``hf.co/<org>/<repo>[:<quant>]`` is pulled from the files huggingface_hub lists; which
of them a tag picks is ``nodes.pull.names``'s. huggingface_hub is imported inside each
function, not at the top: its client brings in a large HTTP stack, and only an hf.co
pull should pay for that (every node imports ``nodes.pull`` to fetch blobs).
"""

from __future__ import annotations

import httpx

from nodes.errors import ModelNotFound, PullFailed

# {file name: (size, sha256)}; no sha256 for a small file kept in git rather than LFS.
Files = dict[str, tuple[int | None, str | None]]


def list_files(repo: str, name: str) -> tuple[Files, str]:
    """Every file of a Hugging Face model repository: {name: (size, sha256)}, and the
    revision they are at (so that every range comes from the same commit). Blocking."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except GatedRepoError:
        raise PullFailed(
            f"hf.co/{repo} is gated: accept its terms on huggingface.co, log in with "
            f"`hf auth login` (or set HF_TOKEN), and pull again."
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(name) from None
    except (HfHubHTTPError, OSError, httpx.HTTPError) as exc:
        raise PullFailed(f"Asking Hugging Face about {repo} failed: {exc}") from None
    files = {
        s.rfilename: (s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    }
    return files, info.sha


def file_url(repo: str, filename: str, revision: str) -> str:
    """The URL of ``filename`` of ``repo`` at ``revision`` (the Hub redirects it to its CDN)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, filename, revision=revision)


def request_headers() -> dict[str, str]:
    """The headers the Hub wants with a download (the user's token, if logged in)."""
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers()
