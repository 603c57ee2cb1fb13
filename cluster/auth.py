"""Ray token authentication: every Corral cluster runs with it on.

Ray reads ``RAY_AUTH_MODE`` and the token when it is imported and caches
both, so setting the environment is not enough once ``ray`` is loaded (as it
is in any process that imported Serve). ``enable_ray_token_auth`` sets the
environment for this process and the Ray processes it starts, and refreshes
Ray's cached view the same way ``ray.init`` does when it turns auth on itself.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TOKEN_FILE = "ray-token"


def ensure_token_file(state_dir: Path) -> Path:
    """The cluster's shared token file under ``state_dir``, created (mode 600) on first use."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def enable_ray_token_auth(state_dir: Path) -> None:
    """Use token auth with the token in ``state_dir`` (unless RAY_AUTH_TOKEN is given)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if not os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(ensure_token_file(state_dir))
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
