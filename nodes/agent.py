"""Joining a box to the cluster: ``corral node start`` and ``corral node stop``.

``start`` probes the box, works out what it offers (RAM and VRAM minus the
reserves, within the caps), checks that it can join (head reachable, token
right, name free), then runs ``ray start`` with those resources and labels.
Without ``--block`` the Ray node runs in the background in a session of its
own, recorded in ``<state_dir>/node.json`` so that ``stop`` ends exactly that
node (``ray stop`` would end every Ray node on the box).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

from nodes import cpu_kernels
from nodes.cpu_kernels import CpuKernels
from nodes.hardware import INVENTORY_FILE_ENV, NodeInventory, load_inventory, probe
from nodes.rayenv import ensure_token, ray_env, system_config_json, use_in_this_process

Role = Literal["head", "worker"]
MIB = 1024**2
RECORD_FILE = "node.json"
LOG_FILE = "node.log"
LABEL_NODE, LABEL_GPU, LABEL_ROLE = "corral.node", "corral.gpu", "corral.role"
# The CPU kernels llama.cpp uses on the box: "amx-repack", "repack", "amx" or "plain".
LABEL_CPU_KERNELS = "corral.cpu_kernels"
VRAM_RESOURCE = "vram_mib"  # the custom Ray resource that counts a node's VRAM for models
_LABEL_OK = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


class NodeStartError(Exception):
    """The node cannot start; the one-line message says what to fix."""


class NodeSettings(BaseModel):
    """How this box joins the cluster and how much of it Corral may use."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None, description="Node name in the cluster (default: the hostname)."
    )
    reserve_ram: ByteSize = Field(
        default=ByteSize(2 * 1024**3),
        description="RAM left to the OS and other programs, e.g. 4GiB.",
    )
    reserve_vram: ByteSize = Field(
        default=ByteSize(512 * MIB), description="VRAM left free on each GPU, e.g. 1GiB."
    )
    max_ram: ByteSize | None = Field(
        default=None, description="At most this much RAM for models, whatever the box has."
    )
    max_vram: ByteSize | None = Field(
        default=None, description="At most this much VRAM (all GPUs together) for models."
    )
    port: int = Field(default=6379, ge=1024, le=65535, description="Ray's port on the head.")
    node_ip: str | None = Field(
        default=None, description="This box's address as other boxes see it (default: Ray's guess)."
    )
    dashboard_port: int = Field(
        default=8265, ge=1024, le=65535, description="Ray dashboard port (127.0.0.1 only)."
    )
    agent_port: int = Field(
        default=52365,
        ge=1024,
        le=65535,
        description="Ray's per-node agent port; change it only to run two nodes on one box.",
    )
    client_port: int = Field(
        default=10001, ge=1024, le=65535, description="Ray client port on the head."
    )
    temp_dir: Path | None = Field(
        default=None, description="Ray's session files (default /tmp/ray)."
    )
    # Ray picks these ports at random unless they are set; a firewall that lets only the
    # cluster's own boxes reach Ray needs them fixed (ansible/ sets them all).
    node_manager_port: int | None = Field(
        default=None, ge=1024, le=65535, description="Ray's node manager (raylet) port."
    )
    object_manager_port: int | None = Field(
        default=None, ge=1024, le=65535, description="Ray's object manager port."
    )
    metrics_export_port: int | None = Field(
        default=None, ge=1024, le=65535, description="Ray's per-node Prometheus metrics port."
    )
    dashboard_agent_grpc_port: int | None = Field(
        default=None, ge=1024, le=65535, description="Ray's per-node agent gRPC port."
    )
    runtime_env_agent_port: int | None = Field(
        default=None, ge=1024, le=65535, description="Ray's runtime environment agent port."
    )
    min_worker_port: int | None = Field(
        default=None,
        ge=1024,
        le=65535,
        description="Lowest port of Ray's worker processes (with max_worker_port; "
        "Ray's default range is 10002-19999).",
    )
    max_worker_port: int | None = Field(
        default=None, ge=1024, le=65535, description="Highest port of Ray's worker processes."
    )
    inventory_file: Path | None = Field(
        default=None,
        description="Declared hardware (YAML) to use instead of probing, e.g. for GPUs "
        "that NVML cannot see.",
    )

    @model_validator(mode="after")
    def _worker_ports_together(self) -> NodeSettings:
        """Ray refuses half a worker port range, but only once ``ray start`` runs."""
        low, high = self.min_worker_port, self.max_worker_port
        if (low is None) != (high is None):
            raise ValueError("set min_worker_port and max_worker_port together, or neither")
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_worker_port {low} is above max_worker_port {high}")
        return self


class NodeOffer(BaseModel):
    """What a node offers the cluster: the Ray resources and labels it starts with."""

    name: str
    role: Role
    gpu: str  # label value: a slug of the first GPU's model, or "none"
    memory: int  # bytes of RAM for models (Ray's "memory" resource)
    object_store_memory: int
    num_gpus: int
    vram_mib: int  # VRAM for models, all GPUs together
    cpu_kernels: str | None = None  # label value (CpuKernels.slug); None: not probed

    @property
    def labels(self) -> dict[str, str]:
        labels = {LABEL_NODE: self.name, LABEL_GPU: self.gpu, LABEL_ROLE: self.role}
        if self.cpu_kernels is not None:
            labels[LABEL_CPU_KERNELS] = self.cpu_kernels
        return labels


def slug(text: str) -> str:
    """A Ray label value from free text: "NVIDIA GeForce RTX 3090" -> "nvidia-geforce-rtx-3090"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63] or "unknown"


def check_name(name: str) -> str:
    if not _LABEL_OK.match(name):
        raise NodeStartError(
            f"node name {name!r} is not usable: use letters, digits, '-', '_' or '.', "
            f"at most 63 characters, starting and ending with a letter or digit (--name)"
        )
    return name


def object_store_size(ram_total: int) -> int:
    """Ray's shared-memory object store: Corral passes little through it."""
    return max(128 * MIB, min(1024 * MIB, ram_total // 20))


def plan_offer(
    inventory: NodeInventory,
    settings: NodeSettings,
    role: Role,
    cpu_kernels: str | None = None,
) -> NodeOffer:
    """The resources a box offers: what it has, minus reserves, within the caps;
    ``cpu_kernels`` (a ``CpuKernels.slug``) becomes the ``corral.cpu_kernels`` label."""
    object_store = object_store_size(inventory.ram_total)
    memory = inventory.ram_total - settings.reserve_ram - object_store
    if settings.max_ram is not None:
        memory = min(memory, settings.max_ram)
    vram = sum(max(0, g.vram_total - settings.reserve_vram) for g in inventory.gpus)
    if settings.max_vram is not None:
        vram = min(vram, settings.max_vram)
    if memory <= 0:
        raise NodeStartError(
            f"nothing left for models: {inventory.ram_total / 1024**3:.1f} GiB of RAM minus the "
            f"{settings.reserve_ram / 1024**3:.1f} GiB reserve and the object store; "
            f"lower --reserve-ram"
        )
    return NodeOffer(
        name=check_name(settings.name or inventory.hostname),
        role=role,
        gpu=slug(inventory.gpus[0].name) if inventory.gpus else "none",
        memory=memory,
        object_store_memory=object_store,
        num_gpus=len(inventory.gpus),
        vram_mib=vram // MIB,
        cpu_kernels=cpu_kernels,
    )


def ray_start_command(
    offer: NodeOffer, settings: NodeSettings, *, address: str | None, ray: str = "ray"
) -> list[str]:
    """The exact ``ray start`` command line for ``offer`` (head when ``address`` is None)."""
    cmd = [ray, "start"]
    if address is None:
        cmd += [
            "--head",
            f"--port={settings.port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={settings.dashboard_port}",
            f"--ray-client-server-port={settings.client_port}",
            f"--system-config={system_config_json()}",
        ]
    else:
        cmd.append(f"--address={address}")
    cmd += [
        f"--memory={offer.memory}",
        f"--object-store-memory={offer.object_store_memory}",
        f"--num-gpus={offer.num_gpus}",
    ]
    if offer.vram_mib:
        cmd.append(f"--resources={json.dumps({VRAM_RESOURCE: offer.vram_mib})}")
    cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in offer.labels.items()))
    cmd.append(f"--dashboard-agent-listen-port={settings.agent_port}")
    for option, port in _pinned_ports(settings).items():
        cmd.append(f"--{option}={port}")
    if settings.node_ip:
        cmd.append(f"--node-ip-address={settings.node_ip}")
    if settings.temp_dir:
        cmd.append(f"--temp-dir={settings.temp_dir}")
    cmd += ["--disable-usage-stats", "--block"]
    return cmd


def _pinned_ports(settings: NodeSettings) -> dict[str, int]:
    """``ray start`` options for the ports that are set; Ray picks the others."""
    ports = {
        "node-manager-port": settings.node_manager_port,
        "object-manager-port": settings.object_manager_port,
        "metrics-export-port": settings.metrics_export_port,
        "dashboard-agent-grpc-port": settings.dashboard_agent_grpc_port,
        "runtime-env-agent-port": settings.runtime_env_agent_port,
        "min-worker-port": settings.min_worker_port,
        "max-worker-port": settings.max_worker_port,
    }
    return {option: port for option, port in ports.items() if port is not None}


def node_env(token: Path, settings: NodeSettings) -> dict[str, str]:
    """The environment ``ray start`` (and so every Ray process of the node) gets."""
    env = {**os.environ, **ray_env(token)}
    if settings.inventory_file:
        env[INVENTORY_FILE_ENV] = str(settings.inventory_file.resolve())
    return env


# -- pre-flight checks --------------------------------------------------------------------


def check_reachable(address: str, timeout: float = 3.0) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise NodeStartError(f"--address {address!r}: use HEAD_HOST:PORT, e.g. 192.168.1.10:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise NodeStartError(
            f"cannot reach the head at {address} ({reason}): is `corral node start --head` "
            f"running there, and is port {port} open to this box?"
        ) from None


def check_can_join(address: str, token: Path, name: str) -> None:
    """The head answers, accepts our token, and has no live node called ``name``."""
    check_reachable(address)
    if not token.is_file():
        raise NodeStartError(
            f"no cluster token at {token}: copy the head's ~/.corral/{token.name} there (mode 600)"
        )
    nodes = _gcs_nodes(address, token)
    for node in nodes:
        if node["alive"] and node["labels"].get(LABEL_NODE) == name:
            raise NodeStartError(
                f"a node named {name!r} is already in the cluster (at {node['address']}): "
                f"choose another name with --name"
            )


def _gcs_nodes(address: str, token: Path) -> list[dict]:
    # Ray's GCS client (what `ray status` uses): answers in milliseconds, and says
    # "wrong token" at once where ray.init would retry for 20 s.
    use_in_this_process(token)
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo
    from ray.exceptions import AuthenticationError, RpcError

    try:
        infos = GcsClient(address=address).get_all_node_info(timeout=5)
    except AuthenticationError:
        raise NodeStartError(
            f"the head at {address} refused the token in {token}: copy the head's "
            f"~/.corral/{token.name} to this box"
        ) from None
    except RpcError as exc:
        raise NodeStartError(f"{address} does not answer as a Ray head: {exc}") from None
    return [
        {
            "alive": info.state == GcsNodeInfo.ALIVE,
            "labels": dict(info.labels),
            "address": info.node_manager_address,
        }
        for info in infos.values()
    ]


def check_port_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            raise NodeStartError(
                f"port {port} is in use: is a head already running on this box "
                f"(`corral node stop`), or choose another with --port"
            ) from None


# -- running and stopping --------------------------------------------------------------


@dataclass
class NodeRecord:
    """What ``node.json`` remembers about the node (or private cluster) this state dir runs."""

    name: str
    role: Role
    address: str  # the cluster's GCS address, HOST:PORT
    pid: int  # the process that owns the Ray node: stopping it stops the node
    kind: Literal["node", "serve"] = "node"
    log: str = ""

    def write(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = state_dir / f".{RECORD_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(state_dir / RECORD_FILE)

    @classmethod
    def read(cls, state_dir: Path) -> NodeRecord | None:
        """The live record, or None (a record whose process is gone is removed)."""
        path = state_dir / RECORD_FILE
        try:
            record = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if not pid_alive(record.pid):
            path.unlink(missing_ok=True)
            return None
        return record

    @staticmethod
    def remove(state_dir: Path) -> None:
        (state_dir / RECORD_FILE).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ray_executable() -> str:
    """The ``ray`` next to this Python (the virtualenv's), else the one on PATH."""
    sibling = Path(sys.executable).with_name("ray")
    return str(sibling) if sibling.exists() else "ray"


def head_address(settings: NodeSettings) -> str:
    host = settings.node_ip or _primary_ip()
    return f"{host}:{settings.port}"


def _primary_ip() -> str:
    """The address other boxes most likely reach this one at (the default route's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def launch(
    command: list[str], env: dict[str, str], record: NodeRecord, state_dir: Path, timeout: float
) -> NodeRecord:
    """Run ``ray start --block`` in the background and wait until the node is up."""
    log_path = state_dir / LOG_FILE
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    record.pid, record.log = proc.pid, str(log_path)
    record.write(state_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if "Ray runtime started" in text:
            return record
        if proc.poll() is not None:
            NodeRecord.remove(state_dir)
            raise NodeStartError(f"ray start failed: {_last_error(text)} (full log: {log_path})")
        time.sleep(0.2)
    stop_process(proc.pid)
    NodeRecord.remove(state_dir)
    raise NodeStartError(f"the node did not come up within {timeout:.0f} s (log: {log_path})")


def _last_error(log_text: str) -> str:
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[-300:]
    return lines[-1][-300:] if lines else "no output"


def stop_process(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the node's process (Ray drains and stops its children), SIGKILL if it hangs."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid) or _reaped(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reaped(pid: int) -> bool:
    """Reap ``pid`` if it is our exited child (else it lingers as a zombie)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def shell_line(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


# -- the whole start / stop ------------------------------------------------------------


@dataclass
class NodePlan:
    """Everything ``corral node start`` will do, known before it does any of it."""

    inventory: NodeInventory
    offer: NodeOffer
    command: list[str]
    env: dict[str, str]
    address: str  # the cluster's address: the head's HOST:PORT
    kernels: CpuKernels | None = None  # llama.cpp's CPU kernels on this box


# Ray puts Unix sockets at <temp_dir>/session_<date>_<time>_<pid>/sockets/plasma_store,
# and Linux limits a socket path to 107 bytes.
_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
MAX_TEMP_DIR = 107 - _SOCKET_SUFFIX


def check_temp_dir(path: Path | None) -> None:
    if path is not None and len(str(path.resolve())) > MAX_TEMP_DIR:
        raise NodeStartError(
            f"--temp-dir {path} is too long for Ray's socket files: use a path of at most "
            f"{MAX_TEMP_DIR} characters, e.g. /tmp/ray-{path.name[:8]}"
        )


def plan_node(
    settings: NodeSettings,
    *,
    address: str | None,
    token: Path,
    kernels: CpuKernels | None = None,
) -> NodePlan:
    """Probe (or read the declared hardware), size the offer, build the command.

    The CPU kernels are this box's even with declared hardware: its replicas run
    here. ``kernels`` replaces the probe (``cpu_kernels.current()``)."""
    check_temp_dir(settings.temp_dir)
    inventory = load_inventory(settings.inventory_file) if settings.inventory_file else probe()
    if kernels is None:
        kernels = cpu_kernels.current()
    role: Role = "head" if address is None else "worker"
    offer = plan_offer(inventory, settings, role, kernels.slug)
    command = ray_start_command(offer, settings, address=address, ray=ray_executable())
    return NodePlan(
        inventory=inventory,
        offer=offer,
        command=command,
        env=node_env(token, settings),
        address=address or head_address(settings),
        kernels=kernels,
    )


def start_node(
    plan: NodePlan,
    settings: NodeSettings,
    state_dir: Path,
    token: Path,
    *,
    block: bool = False,
    timeout: float = 120.0,
) -> NodeRecord:
    """Check, then start the node; with ``block`` this process becomes ``ray start``."""
    if running := NodeRecord.read(state_dir):
        raise NodeStartError(
            f"{state_dir} already runs node {running.name!r} (pid {running.pid}): "
            f"`corral node stop` first, or use another --state-dir"
        )
    if plan.offer.role == "head":
        check_port_free(settings.port)
        ensure_token(token)
    else:
        check_can_join(plan.address, token, plan.offer.name)
    record = NodeRecord(plan.offer.name, plan.offer.role, plan.address, pid=os.getpid())
    if block:
        record.write(state_dir)
        os.execvpe(plan.command[0], plan.command, plan.env)
    return launch(plan.command, plan.env, record, state_dir, timeout)


def stop_node(state_dir: Path) -> NodeRecord | None:
    """Stop the node started from ``state_dir``; None if none runs."""
    record = NodeRecord.read(state_dir)
    if record is None:
        return None
    if record.kind == "serve":
        raise NodeStartError(
            f"{state_dir} belongs to a running `corral serve` (pid {record.pid}); stop that "
            f"with Ctrl-C instead"
        )
    stop_process(record.pid)
    NodeRecord.remove(state_dir)
    return record
