"""Which llama.cpp CPU kernels are safe on this box: the "extra buffer types" or not.

llama.cpp may put a CPU model's weights in *extra buffer types*: Intel AMX tiles
and the "repack" layouts of the AVX2/AVX-512 (and ARM) kernels. They are faster,
but ggml's AMX code built by GCC older than 13 segfaults on the first batch of two
or more tokens (issue 15), and a process that dies in a kernel takes its replica
with it. So, once per box, a child process loads the starter model with extra
buffer types on and decodes a prompt and a few tokens greedily. If the child dies
by a signal (or fails), extra buffer types are off for this box.

The outcome is cached on disk, keyed by what can change it (the llama.cpp
libraries' paths, sizes and mtimes, the CPU's model and flags, the kernel, the
llama-cpp-python version), so later calls cost a few ``stat`` calls and one small
file read. ``CORRAL_LLAMA_EXTRA_BUFTS=on|off|auto`` overrides the probe.

The decision itself (``decide``) is a pure function of the build's features, the
CPU, the override and the probe's outcome; everything else here is I/O.

Run ``python -m nodes.cpu_kernels`` to see (and cache) this box's choice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("corral.cpu_kernels")

OVERRIDE_ENV = "CORRAL_LLAMA_EXTRA_BUFTS"
Override = Literal["auto", "on", "off"]
CACHE_VERSION = 1
PROBE_TIMEOUT = 120.0  # seconds: the probe loads a 98 MB model, on a busy box too
# Long enough to be decoded as one batch of many rows (the AMX crash needs two or more).
PROBE_PROMPT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, lit the lamp "
    "and wrote the weather in his log."
)
PROBE_TOKENS = 8


@dataclass(frozen=True, slots=True)
class BuildFeatures:
    """What the loaded llama.cpp was compiled with (``llama_print_system_info``)."""

    amx_int8: bool = False
    avx512: bool = False
    avx512_vnni: bool = False
    avx2: bool = False
    repack: bool = False

    @classmethod
    def parse(cls, system_info: str) -> BuildFeatures:
        """From text such as ``CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |``."""
        on = {name for name, value in re.findall(r"(\w+)\s*=\s*(\w+)", system_info) if value == "1"}
        return cls(
            amx_int8="AMX_INT8" in on,
            avx512="AVX512" in on,
            avx512_vnni="AVX512_VNNI" in on,
            avx2="AVX2" in on,
            repack="REPACK" in on,
        )

    @property
    def amx(self) -> bool:
        """ggml compiles its AMX buffer type only with both (ggml-cpu.cpp)."""
        return self.amx_int8 and self.avx512_vnni


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """How the child that decoded with extra buffer types on ended."""

    ok: bool
    detail: str  # "decoded 8 tokens after a 28-token prompt", "crashed: SIGSEGV", ...
    cacheable: bool = True  # a timeout or a missing model says nothing about the kernels
    at: float = 0.0  # when it ran (epoch seconds)


@dataclass(frozen=True, slots=True)
class CpuKernels:
    """The CPU kernels llama.cpp uses on this box, and why."""

    extra_bufts: bool  # llama_model_params.use_extra_bufts
    label: str  # for people: "AMX+repack", "plain (extra buffer types crashed: SIGSEGV)"
    slug: str  # for the Ray label corral.cpu_kernels: "amx-repack", "repack", "amx", "plain"
    reason: str
    build: BuildFeatures
    cpu_amx: bool  # the CPU has AMX (amx_int8 in /proc/cpuinfo)


# -- the decision (pure) ---------------------------------------------------------------


def parse_override(value: str | None) -> Override:
    """``CORRAL_LLAMA_EXTRA_BUFTS``: on/off (also 1/0, true/false), else auto."""
    text = (value or "auto").strip().lower()
    if text in ("on", "1", "true", "yes"):
        return "on"
    if text in ("off", "0", "false", "no"):
        return "off"
    if text != "auto":
        log.warning("%s=%r is not on, off or auto: taking auto", OVERRIDE_ENV, value)
    return "auto"


def kernels_in_use(build: BuildFeatures, cpu_amx: bool) -> tuple[str, str]:
    """(label, slug) of the kernels llama.cpp picks when extra buffer types are on."""
    amx = build.amx and cpu_amx
    if amx and build.repack:
        return "AMX+repack", "amx-repack"
    if amx:
        return "AMX", "amx"
    if build.repack:
        if cpu_amx:
            return "repack (AMX not built)", "repack"
        if build.amx:
            return "repack (no AMX on this CPU)", "repack"
        return "repack", "repack"
    return "plain (no extra buffer types built)", "plain"


def decide(
    build: BuildFeatures, cpu_amx: bool, override: Override, outcome: ProbeOutcome | None
) -> CpuKernels:
    """Extra buffer types on or off, from the build, the CPU, the override and the probe.

    ``outcome`` is the probe's (None when the override makes it unnecessary)."""
    label, slug = kernels_in_use(build, cpu_amx)

    def plain(why: str, reason: str) -> CpuKernels:
        return CpuKernels(False, f"plain ({why})", "plain", reason, build, cpu_amx)

    if override == "off":
        return plain(f"extra buffer types off by {OVERRIDE_ENV}", f"{OVERRIDE_ENV}=off")
    if override == "on":
        return CpuKernels(True, label, slug, f"{OVERRIDE_ENV}=on (not probed)", build, cpu_amx)
    if outcome is None:
        raise ValueError("auto needs the probe's outcome")
    if outcome.ok:
        return CpuKernels(
            True,
            label,
            slug,
            f"a probe with extra buffer types on {outcome.detail}",
            build,
            cpu_amx,
        )
    suspect = (
        "; ggml's AMX kernels built by GCC < 13 are known to crash (issue 15)"
        if build.amx and cpu_amx
        else ""
    )
    return plain(
        f"extra buffer types {outcome.detail}",
        f"a probe with extra buffer types on {outcome.detail}{suspect}",
    )


def outcome_of(returncode: int, stdout: str, stderr: str) -> ProbeOutcome:
    """A probe child's exit, as an outcome: killed by a signal, failed, or its report."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return ProbeOutcome(False, f"crashed: {name}")
    if returncode != 0:
        last = next((ln for ln in reversed(stderr.splitlines()) if ln.strip()), "no output")
        return ProbeOutcome(False, f"failed: exit {returncode}: {last.strip()[-200:]}")
    try:
        report = json.loads(stdout.strip().splitlines()[-1])
        detail = f"decoded {report['generated']} tokens after a {report['prompt']}-token prompt"
    except (ValueError, IndexError, KeyError, TypeError):
        return ProbeOutcome(False, f"failed: unreadable report {stdout[-200:]!r}")
    return ProbeOutcome(True, detail)


# -- this box (I/O) --------------------------------------------------------------------


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags (empty where /proc/cpuinfo is missing)."""
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        text = cpuinfo.read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() in ("flags", "Features"):  # x86, ARM
            flags = frozenset(value.split())
            break
    return model, flags


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace")


def library_files() -> list[Path]:
    """The llama.cpp shared libraries llama-cpp-python loaded (the CPU backend among them)."""
    import llama_cpp.llama_cpp as lib

    folder = Path(lib._lib._name).resolve().parent
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and ".so" in p.name
    ) or [Path(lib._lib._name).resolve()]


def fingerprint(info: str) -> dict[str, object]:
    """Everything that can change the probe's outcome; the cache is keyed by its hash."""
    import llama_cpp

    model, flags = cpu_identity()
    files = []
    for path in library_files():
        stat = path.stat()
        files.append([str(path), stat.st_size, stat.st_mtime_ns])
    return {
        "llama_cpp": llama_cpp.__version__,
        "libraries": files,
        "system_info": info,
        "cpu": model,
        "cpu_flags": sorted(flags),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }


def cache_key(about: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/corral``, else ``~/.cache/corral``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "corral"


def _cache_file(folder: Path, key: str) -> Path:
    return folder / f"cpu_kernels-{key[:16]}.json"


def read_cached(folder: Path, key: str) -> ProbeOutcome | None:
    """The cached outcome for ``key``; None if absent, for another key, or unreadable."""
    try:
        data = json.loads(_cache_file(folder, key).read_text())
        if data.get("version") != CACHE_VERSION or data.get("key") != key:
            return None
        outcome = data["outcome"]
        return ProbeOutcome(bool(outcome["ok"]), str(outcome["detail"]), True, float(outcome["at"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_cached(folder: Path, key: str, outcome: ProbeOutcome, about: dict) -> None:
    """Atomically, so that a reader never sees half a file; a read-only home only logs."""
    path = _cache_file(folder, key)
    data = {"version": CACHE_VERSION, "key": key, "outcome": asdict(outcome), "fingerprint": about}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot cache the CPU kernel probe in %s: %s", folder, exc)


def run_probe(model: Path, timeout: float = PROBE_TIMEOUT) -> ProbeOutcome:
    """Decode with extra buffer types on, in a child process: a crash kills only the child."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])  # so `-m nodes.cpu_kernels` imports
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "nodes.cpu_kernels", "--probe-child", str(model)]
    started = time.time()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeOutcome(False, f"hung: no answer in {timeout:.0f} s", False, started)
    except OSError as exc:
        return ProbeOutcome(False, f"failed: cannot run the probe: {exc}", False, started)
    outcome = outcome_of(done.returncode, done.stdout, done.stderr)
    # A child that exits with an error (no model, no memory) says nothing about the
    # kernels: retry next time. A crash or a success is the kernels' doing: keep it.
    cacheable = outcome.ok or done.returncode < 0
    return ProbeOutcome(outcome.ok, outcome.detail, cacheable, started)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One probe per box at a time: replicas starting together wait for the first."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / "cpu_kernels.lock").open("a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def current(
    model: Path | None = None,
    *,
    folder: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> CpuKernels:
    """This box's choice: from the override, else the cached probe, else a new probe."""
    environ = os.environ if environ is None else environ
    info = system_info()
    build = BuildFeatures.parse(info)
    cpu_amx = "amx_int8" in cpu_identity()[1]
    override = parse_override(environ.get(OVERRIDE_ENV))
    if override != "auto":
        return decide(build, cpu_amx, override, None)
    folder = folder or cache_dir()
    about = fingerprint(info)
    key = cache_key(about)
    outcome = read_cached(folder, key)
    if outcome is None:
        with _locked(folder):
            outcome = read_cached(folder, key)  # another process may have probed meanwhile
            if outcome is None:
                outcome = _probe_and_cache(model, folder, key, about)
    return decide(build, cpu_amx, override, outcome)


def _probe_and_cache(model: Path | None, folder: Path, key: str, about: dict) -> ProbeOutcome:
    if model is None:
        from nodes.models import starter_model_path

        model = starter_model_path()
    log.info("probing llama.cpp's extra buffer types with %s (once per box)", model.name)
    outcome = run_probe(model)
    log.info("CPU kernel probe: %s", outcome.detail)
    if outcome.cacheable:
        write_cached(folder, key, outcome, about)
    return outcome


# -- loading a model with the choice ---------------------------------------------------

_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def extra_bufts(enabled: bool) -> Iterator[None]:
    """Models loaded by ``llama_cpp.Llama`` inside this block get ``use_extra_bufts=enabled``.

    llama-cpp-python 0.3.36's ``Llama`` has no argument for it: it builds its
    ``llama_model_params`` from ``llama_model_default_params()`` and loads the model
    in the same constructor. So, for the constructor's duration, that function returns
    params with ``use_extra_bufts`` set. The lock keeps two loads in one process from
    seeing each other's choice."""
    import llama_cpp.llama_cpp as lib

    with _PARAMS_LOCK:
        original = lib.llama_model_default_params

        def params() -> lib.llama_model_params:
            chosen = original()
            chosen.use_extra_bufts = enabled
            return chosen

        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = original


def _probe_child(model: str) -> None:
    """The probe itself (in the child): load with extra buffer types, decode greedily."""
    import llama_cpp

    threads = min(2, os.cpu_count() or 1)
    with extra_bufts(True):
        llm = llama_cpp.Llama(
            model, n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    prompt = llm.tokenize(PROBE_PROMPT.encode())
    llm.eval(prompt)  # one batch of many rows: the matmul that crashed (issue 15)
    for _ in range(PROBE_TOKENS):
        llm.eval([llm.sample(temp=0.0)])  # then one row at a time
    print(json.dumps({"prompt": len(prompt), "generated": PROBE_TOKENS}), flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--probe-child"] and len(argv) == 2:
        _probe_child(argv[1])
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernels = current()
    if "--json" in argv:
        print(json.dumps(asdict(kernels), indent=2))
    else:
        state = "on" if kernels.extra_bufts else "off"
        print(f"CPU kernels: {kernels.label} (extra buffer types {state})")
        print(f"why: {kernels.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
