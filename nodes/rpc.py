"""llama.cpp's RPC backend: a box lends its memory and compute to a model whose main
replica runs on another box (a split), and that replica reaches its lenders.

Both sides are llama.cpp's own code in the installed llama-cpp-python, built with
``-DGGML_RPC=on`` (``libggml-rpc.so`` beside ``libllama.so``), reached through
ctypes (the header is ``ggml/include/ggml-rpc.h`` of the vendored llama.cpp):

* **A lender** runs ``ggml_backend_rpc_start_server`` on this box's CPU device (or on
  its GPUs, when the planner has it lend VRAM: ``served_devices``). That
  call blocks for good and only SIGKILL stops it, so it runs in a process of its
  own (``RpcServer`` starts ``python -m nodes.rpc serve ...`` and kills it). Its
  cache directory keeps the tensors it was sent, by hash, so a reload does not send
  the weights over the LAN again.
* **The main replica** registers each lender as a ggml backend
  (``ggml_backend_rpc_add_server`` + ``ggml_backend_register``: devices RPC0,
  RPC1 ...) before it loads the model; ``n_gpu_layers`` and ``tensor_split`` then
  put layers there as they would on GPUs.

llama.cpp aborts the whole process when a lender cannot be reached or speaks
another protocol version, so ``check_server`` says hello first, in Python, and
raises ``RpcUnreachable`` naming the endpoint instead.

The RPC server has no authentication and runs whatever graph a client sends: it
must listen only on a cluster address, on a port the firewall opens only between
the cluster's hosts, and only while a split needs it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nodes.errors import ModelLoadFailed

HELLO = 14  # RPC_CMD_HELLO: the first command of every connection, in every version
CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE: the transport capabilities in a hello
DEVICE_CPU, DEVICE_GPU = 0, 1  # GGML_BACKEND_DEVICE_TYPE_CPU, _GPU
START_TIMEOUT = 30.0  # seconds a new server has to accept connections
PR_SET_PDEATHSIG = 1  # prctl(2)
DEFAULT_CACHE = Path.home() / ".cache" / "corral" / "rpc"  # tensors a lender was sent


class RpcUnavailable(ModelLoadFailed):
    """The installed llama.cpp has no RPC backend."""


class RpcUnreachable(ModelLoadFailed):
    """A lender does not answer, or speaks another version of the protocol."""


@dataclass(frozen=True, slots=True)
class Version:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    def serves(self, client: Version) -> bool:
        """Whether a server of this version takes ``client`` (llama.cpp's own rule)."""
        return self.major == client.major and self.minor <= client.minor


def _lib_dir() -> Path:
    import llama_cpp.llama_cpp as low

    return Path(low._base_path)


def _load(name: str) -> ctypes.CDLL:
    path = _lib_dir() / f"lib{name}.so"
    if not path.is_file():
        raise RpcUnavailable(
            f"llama-cpp-python was built without llama.cpp's RPC backend ({path} is missing): "
            f"rebuild it with CMAKE_ARGS=-DGGML_RPC=on (make does)."
        )
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def available() -> bool:
    return (_lib_dir() / "libggml-rpc.so").is_file()


def protocol_version() -> Version:
    """The RPC protocol of the installed llama.cpp (from the header it ships)."""
    header = _lib_dir().parents[1] / "include" / "ggml-rpc.h"
    text = header.read_text() if header.is_file() else ""
    parts = [
        re.search(rf"#define RPC_PROTO_{part}_VERSION\s+(\d+)", text)
        for part in ("MAJOR", "MINOR", "PATCH")
    ]
    if not all(parts):
        raise RpcUnavailable(f"cannot read the RPC protocol version from {header}")
    return Version(*(int(p.group(1)) for p in parts))  # type: ignore[union-attr]


def hello(endpoint: str, timeout: float = 5.0) -> Version:
    """Say hello to the server at ``endpoint`` (HOST:PORT) as llama.cpp does; its version."""
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.sendall(struct.pack("<BQ", HELLO, CONN_CAPS) + bytes(CONN_CAPS))
        size = struct.unpack("<Q", _read(sock, 8))[0]
        answer = _read(sock, size)
    if size < 3:
        raise OSError(f"a hello of {size} bytes")
    return Version(answer[0], answer[1], answer[2])


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("the connection closed")
        data += chunk
    return data


def check_server(endpoint: str, box: str = "", timeout: float = 5.0) -> Version:
    """``endpoint``'s version if this process may use it; else ``RpcUnreachable`` with why."""
    where = f"{box}'s RPC worker at {endpoint}" if box else f"the RPC worker at {endpoint}"
    try:
        version = hello(endpoint, timeout)
    except (OSError, ValueError, struct.error) as exc:
        raise RpcUnreachable(
            f"{where} does not answer ({exc}): is the box up, and does the firewall let the "
            f"cluster's hosts reach that port?"
        ) from None
    ours = protocol_version()
    if not version.serves(ours):
        raise RpcUnreachable(
            f"{where} speaks llama.cpp RPC protocol {version}, this box {ours}: install the "
            f"same Corral (and llama-cpp-python) on both."
        )
    return version


# -- the main replica's side --------------------------------------------------------

_registered: dict[str, int] = {}  # endpoint -> devices it added, in this process
_register_lock = threading.Lock()


def add_servers(endpoints: list[str], boxes: list[str] | None = None) -> int:
    """Register each lender as a ggml backend of this process (once each), checked first;
    the number of devices they add."""
    boxes = boxes or [""] * len(endpoints)
    rpc, ggml = _load("ggml-rpc"), _load("ggml")
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None
    total = 0
    with _register_lock:
        for endpoint, box in zip(endpoints, boxes, strict=True):
            if endpoint not in _registered:
                check_server(endpoint, box)
                before = _device_count(ggml)
                reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
                if not reg:
                    raise RpcUnreachable(f"the RPC worker at {endpoint} offers no device")
                ggml.ggml_backend_register(reg)
                _registered[endpoint] = _device_count(ggml) - before
            total += _registered[endpoint]
    return total


def _device_count(ggml: ctypes.CDLL) -> int:
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    return ggml.ggml_backend_dev_count()


def _ggml_devices() -> ctypes.CDLL:
    """libggml (as llama_cpp loaded it, backends registered) with the prototypes of its
    device calls that this module uses."""
    import llama_cpp  # noqa: F401 - loads libggml with its backends registered

    ggml = ctypes.CDLL(str(_lib_dir() / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    prototypes = {
        "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
        "ggml_backend_dev_name": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_dev_description": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_dev_type": ([ctypes.c_void_p], ctypes.c_int),
        "ggml_backend_dev_by_type": ([ctypes.c_int], ctypes.c_void_p),
        "ggml_backend_dev_buffer_type": ([ctypes.c_void_p], ctypes.c_void_p),
    }
    for name, (args, result) in prototypes.items():
        getattr(ggml, name).argtypes = args
        getattr(ggml, name).restype = result
    return ggml


def _devices() -> list[tuple[int, str, str, int]]:
    """Every device llama.cpp has in this process: (handle, name, description, type)."""
    ggml = _ggml_devices()
    found = []
    for i in range(_device_count(ggml)):
        d = ggml.ggml_backend_dev_get(i)
        name = (ggml.ggml_backend_dev_name(d) or b"").decode()
        description = (ggml.ggml_backend_dev_description(d) or b"").decode()
        found.append((d, name, description, ggml.ggml_backend_dev_type(d)))
    return found


def offload_devices(endpoints: list[str]) -> tuple[list[list[int]], list[int]]:
    """The devices a split model offloads to, in order: each RPC worker's (``endpoints``,
    registered by ``add_servers``: its CPU, or every GPU of a worker lending VRAM), then
    this box's own GPUs.

    llama.cpp's own choice when given none leaves registered RPC devices out here, so
    the model gets this list itself (``llama_model_params.devices``)."""
    devices = _devices()
    remote = []
    for endpoint in endpoints:
        mine = [d for d, name, desc, _ in devices if name.startswith("RPC") and desc == endpoint]
        if not mine:
            raise RpcUnreachable(f"the RPC worker at {endpoint} is not registered in this process")
        remote.append(mine)
    local = [d for d, name, _, kind in devices if kind == DEVICE_GPU and not name.startswith("RPC")]
    return remote, local


def tensor_split(parts: list[int], devices: list[int], own: int, local: int) -> list[float]:
    """llama.cpp's ``tensor_split`` for a split model: the share of offloaded layers of
    each device, in the order of ``offload_devices``. ``parts``: the blocks each worker
    holds, ``devices``: how many devices each worker serves (its blocks spread evenly
    over them), ``own``: the blocks on this box's ``local`` GPUs. The output layer is
    counted last, on the last device with blocks (its weights stay here: see
    ``output_on_cpu``), so every other device holds exactly its blocks."""
    shares = [layers / n for layers, n in zip(parts, devices, strict=True) for _ in range(n)]
    shares += [own / local if own else 0.0] * local
    last = len(shares) - 1 if own and local else sum(devices) - 1
    shares[last] += 1
    return shares


class _BuftOverride(ctypes.Structure):
    """llama.cpp's ``llama_model_tensor_buft_override``: tensors whose name matches
    ``pattern`` (a regular expression) go to buffer type ``buft``."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


# The output layer's tensors: its norm and its matrix (tied models use the token
# embeddings as that matrix, under their own name).
OUTPUT_TENSORS = rb"^(output_norm|output|token_embd)\.weight$"


def output_on_cpu() -> ctypes.Array:
    """A NULL-terminated override list that keeps the output layer in this process's RAM
    (``llama_model_params.tensor_buft_overrides``; it must live until the model is loaded).

    llama.cpp offloads the output layer with the last offloaded block, here to the last
    RPC worker, which then sends the logits back every step: a row of n_vocab floats per
    token (192 KiB for a 49k vocabulary), against n_embd floats (2 KiB) for the hidden
    state when the main replica computes the logits itself."""
    ggml = _ggml_devices()
    cpu = ggml.ggml_backend_dev_buffer_type(ggml.ggml_backend_dev_by_type(DEVICE_CPU))
    return (_BuftOverride * 2)(_BuftOverride(OUTPUT_TENSORS, cpu), _BuftOverride(None, None))


# -- a lender ---------------------------------------------------------------------------


def served_devices(devices: list[tuple[int, str, str, int]], gpus: bool) -> list[int]:
    """What a worker serves, of this process's ``devices`` (``_devices``): every GPU
    when it lends VRAM (``gpus``), as llama.cpp's ``rpc-server`` does by default, else
    the CPU."""
    kind = DEVICE_GPU if gpus else DEVICE_CPU
    found = [d for d, name, _, t in devices if t == kind and not name.startswith("RPC")]
    if not found:
        raise RpcUnavailable(f"llama.cpp found no {'GPU' if gpus else 'CPU'} device to serve")
    return found if gpus else found[:1]


def serve(endpoint: str, cache_dir: str | None, threads: int, gpus: bool = False) -> None:
    """Serve this box's CPU (or, ``gpus``, its GPUs) over RPC at ``endpoint``; never
    returns."""
    rpc = _load("ggml-rpc")
    served = served_devices(_devices(), gpus)
    devices = (ctypes.c_void_p * len(served))(*served)
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    rpc.ggml_backend_rpc_start_server.restype = None
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    rpc.ggml_backend_rpc_start_server(
        endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, len(served), devices
    )
    raise RpcUnavailable(f"llama.cpp's RPC server at {endpoint} stopped (see its output)")


class RpcServer:
    """``serve`` in a process of its own (see the module docstring), killed by ``stop``."""

    def __init__(
        self,
        endpoint: str,
        cache_dir: str | None,
        threads: int,
        log: Path | None = None,
        gpus: bool = False,
    ):
        self.endpoint = endpoint
        command = [sys.executable, "-m", "nodes.rpc", "serve", endpoint, "--threads", str(threads)]
        command += ["--parent", str(os.getpid())]  # it dies with this process
        if gpus:
            command.append("--gpus")
        if cache_dir:
            command += ["--cache-dir", cache_dir]
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child's
        try:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the server answers a hello; ``RpcUnreachable`` if it died or never did."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RpcUnreachable(
                    f"the RPC server for {self.endpoint} exited with {self.process.returncode} "
                    f"before it answered (is the port taken?)"
                )
            try:
                hello(self.endpoint, timeout=1.0)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RpcUnreachable(
                        f"the RPC server for {self.endpoint} did not answer in {timeout:.0f} s"
                    ) from None
                time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # it ignores anything gentler
            self.process.wait()


class RpcLender:
    """A box's RPC worker for one split placement. The controller runs it as a Ray actor
    pinned to the box (its ``corral.node`` label) and holding the memory of the layers the
    box lends, so Ray counts them; the server process lives as long as the actor and dies
    with it (a killed actor takes its server along: see ``_die_with``).

    It listens on ``host`` (the box's cluster address, never 0.0.0.0) on the first free
    port of ``ports`` (the range the firewall opens between the cluster's hosts); tensors
    it was sent stay in ``cache_dir``, so a reload does not send them over the LAN again.
    """

    def __init__(
        self, host: str, ports: tuple[int, int], cache_dir: str, threads: int, gpus: bool = False
    ) -> None:
        """``host`` "": this box's address in the cluster (Ray's node address); ``cache_dir``
        "": ``~/.cache/corral/rpc`` of the user Ray runs as; ``gpus``: lend the box's GPUs
        (its VRAM) instead of its CPU."""
        if not host:
            import ray

            host = ray.util.get_node_ip_address()
        cache_dir = cache_dir or str(DEFAULT_CACHE)
        first, last = ports
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        for port in range(first, last + 1):
            if not _free(host, port):
                continue
            log = Path(cache_dir) / f"rpc-{port}.log"
            server = RpcServer(f"{host}:{port}", cache_dir, threads, log=log, gpus=gpus)
            try:
                server.wait_ready()
            except RpcUnreachable:  # taken meanwhile: the next one
                server.stop()
                continue
            self._server = server
            return
        raise RpcUnavailable(f"no free port in {first}-{last} on {host} for an RPC worker")

    def endpoint(self) -> str:
        return self._server.endpoint

    def pid(self) -> int:
        """The server's process."""
        return self._server.process.pid

    def alive(self) -> bool:
        return self._server.alive

    def __del__(self) -> None:
        if server := getattr(self, "_server", None):
            server.stop()


def _free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nodes.rpc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serving = sub.add_parser("serve", help="serve this box's CPU over llama.cpp RPC")
    serving.add_argument("--gpus", action="store_true", help="serve its GPUs instead")
    serving.add_argument("endpoint", help="HOST:PORT to listen on (a cluster address)")
    serving.add_argument("--cache-dir", default=None)
    serving.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    serving.add_argument("--parent", type=int, default=0, help="die with this process")
    args = parser.parse_args(argv)
    if args.parent:
        _die_with(args.parent)
    serve(args.endpoint, args.cache_dir, args.threads, args.gpus)


def _die_with(parent: int) -> None:
    """SIGKILL this process when ``parent`` exits (Linux's parent-death signal): a worker
    whose owner was killed must not keep lending the box to whoever connects."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was set
        os._exit(1)


if __name__ == "__main__":
    main()
