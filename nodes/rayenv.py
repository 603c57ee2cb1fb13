"""The environment every Ray process of a Corral node runs with.

* Token authentication, always: the shared token lives in a file (mode 600)
  in Corral's state directory and must be copied to every box.
* Serve tuning for small boxes (measured on 2 cores, see deployments/).
* Faster detection of dead nodes than Ray's defaults (~25 s), so the cluster
  view shows a box that was unplugged as down within seconds.
* On a box alone (``corral serve`` without a cluster), loopback only: every
  Ray process binds 127.0.0.1 (``loopback_only``).

Ray reads ``RAY_AUTH_MODE`` and the token when it is imported and caches
both, so in a process that already imported Ray, ``use_in_this_process``
also refreshes Ray's cached view, as ``ray.init`` does when it turns auth on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

TOKEN_FILE = "ray-token"

SERVE_ENV = {
    # Replica code and the handle router on the replica's own event loop instead
    # of hopping between threads; Corral's replicas never block their loop.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # Serve's controller wakes 10 times a second (its default). Waking twice a second
    # gave the model back ~2% of a core, but every cold start waited for two of its
    # ticks: 2.5 s instead of 1.7 s to the first token (bench/cold_start.py).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1",
}

# GCS health checks of every node: a node that stops answering is declared dead
# after about 1 s x 4 instead of Ray's default 3 s x 5 (plus its timeout).
SYSTEM_CONFIG = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 4,
}


def token_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_FILE


def ensure_token(path: Path) -> Path:
    """The token file at ``path``, created with a new random token (mode 600) if missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def ray_env(token: Path) -> dict[str, str]:
    """Environment variables for Ray processes of a Corral node using ``token``."""
    auth = {"RAY_AUTH_MODE": "token"}
    if not os.environ.get("RAY_AUTH_TOKEN"):
        auth["RAY_AUTH_TOKEN_PATH"] = str(token)
    return {**auth, **SERVE_ENV}


def system_config_json() -> str:
    return json.dumps(SYSTEM_CONFIG, separators=(",", ":"))


def use_in_this_process(token: Path) -> None:
    """Make this process (and the Ray processes it starts) use ``ray_env(token)``."""
    for key, value in ray_env(token).items():
        if key.startswith("RAY_SERVE_"):
            os.environ.setdefault(key, value)  # a user's own tuning wins
        else:
            os.environ[key] = value
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def loopback_only() -> str:
    """Make the Ray processes this process starts or joins use 127.0.0.1 as the node's
    address, and return it (for ``ray.init(_node_ip_address=...)``).

    Ray binds its gRPC servers (GCS, raylet, workers), its agents and its metrics
    endpoints to all interfaces unless the node's address is loopback, and it turns
    a given 127.0.0.1 into the box's LAN address unless clusters are "disabled", as
    it does on macOS and Windows: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says so to the
    processes it starts. Ray read that variable when this process imported it, so
    its cached value is set here too (checked by tests/integration/test_cli.py,
    which lists every socket a single-box ``corral serve`` listens on)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    return "127.0.0.1"


def serve_replica_on_loopback() -> None:
    """In a replica of a loopback-only cluster (``loopback_only``): Serve's
    inter-deployment gRPC server binds 127.0.0.1 too. Serve 2.60 hard-codes "[::]:0"
    for it (token-authenticated, but facing the LAN on a box that has no reason to);
    Serve tells callers its port beside the node's address, 127.0.0.1 here. Call before
    the replica finishes initializing; nothing changes where Ray runs as a cluster."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    from ray.serve._private import replica as serve_replica

    add_port = serve_replica.add_port_to_grpc_server
    if getattr(add_port, "loopback", False):
        return

    def on_loopback(server, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        return add_port(server, address)

    on_loopback.loopback = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = on_loopback


def cluster_token() -> str | None:
    """The Ray token this process runs with (its environment, as Ray reads it), if any."""
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
    try:
        return Path(path).expanduser().read_text().strip() or None
    except OSError:
        return None


def node_api_key() -> str | None:
    """The bearer key a cluster node shows the head's API to fetch a model file.

    Derived from the Ray token every node already holds, so API keys need not be
    copied to the nodes, and the key gives nothing the Ray token did not."""
    token = cluster_token()
    if not token:
        return None
    digest = hmac.new(token.encode(), b"corral node blob fetch", hashlib.sha256).hexdigest()
    return "corral-node-" + digest
