"""llama.cpp's own ``llama-server``, built from the same commit as the installed bindings.

The benchmarks compare Corral with llama-server on the same llama.cpp: the one
that the installed llama-cpp-python vendors. So this module

1. reads the installed llama-cpp-python's version;
2. gets its sdist (``pip download --no-binary :all: --no-deps``) into
   ``bench/.cache/sdist`` unless it is there, and unpacks it;
3. takes the CMake flags the wheel is built with from the Makefile
   (``make llama-flags``: the AMX logic, ``CMAKE_ARGS``), adds
   ``-DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release`` (and no web UI download);
4. builds only the ``llama-server`` target (``--jobs``, 2 by default) and keeps
   the binary with the shared libraries it links in
   ``bench/.cache/llama-server/<version>-<key>/``, ``key`` being a hash of the
   version, the flags and the compilers. A second call finds it there.

``--build-dir`` reuses a CMake build folder already configured from the same
llama.cpp by the same compilers (checked against its ``CMakeCache.txt``): it is
configured again with the flags above, so only what llama-server adds, and what
a changed flag touches, gets compiled. (Options it holds that the flags above do
not name stay as they are there.)

Run: .venv/bin/python bench/_llama_server.py [--build-dir DIR] [--jobs 2]
     (prints the binary's path; ``--help-server`` prints llama-server's own --help)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"  # ignored by git (.gitignore)
# Build switches that change no code of the server's hot path: no curl (no network),
# no web UI download at build time, none of the other tools.
EXTRA_ARGS = [
    "-DLLAMA_CURL=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
]
PROGRESS = re.compile(r"^\[\s*\d+%\]")


@dataclass(frozen=True)
class BuildFlags:
    """How the installed wheel's llama.cpp is compiled, as the Makefile says."""

    cmake_args: list[str]  # e.g. ["-DCMAKE_C_FLAGS=-mno-amx-tile ...", ...]
    cc: str
    cxx: str
    wheel_key: str  # the Makefile's key of the wheel folder

    @property
    def all_args(self) -> list[str]:
        return [*self.cmake_args, *EXTRA_ARGS]


def say(message: str) -> None:
    print(f"[llama-server] {message}", flush=True)


def installed_version() -> str:
    """The llama-cpp-python this venv imports (and pyproject.toml pins)."""
    version = metadata.version("llama-cpp-python")
    pinned = re.search(r'"llama-cpp-python==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    if pinned and pinned.group(1) != version:
        say(f"note: pyproject.toml pins {pinned.group(1)}, the venv has {version}: using {version}")
    return version


def makefile_flags() -> BuildFlags:
    """``make llama-flags``: the compilers and CMAKE_ARGS the Makefile builds the wheel with."""
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(ROOT), "llama-flags"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    compilers = re.match(r"(\S+) and (\S+)", fields.get("compilers", "cc and c++"))
    cc, cxx = compilers.groups() if compilers else ("cc", "c++")
    wheel = Path(fields.get("wheel", "").strip())
    mark = ROOT / ".venv" / f".llama-{wheel.name}"
    if wheel.name and not mark.exists():
        say(f"note: the venv's llama-cpp-python was not built with these flags ({mark} is missing)")
    return BuildFlags(shlex.split(fields.get("CMAKE_ARGS", "")), cc, cxx, wheel.name)


def cache_key(version: str, flags: BuildFlags) -> str:
    text = json.dumps([version, flags.all_args, flags.cc, flags.cxx])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def sdist_source(version: str) -> Path:
    """The vendored llama.cpp of llama-cpp-python ``version``, downloaded and unpacked once."""
    name = f"llama_cpp_python-{version}"
    tree = CACHE / "src" / name / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    folder = CACHE / "sdist"
    archive = folder / f"{name}.tar.gz"
    if not archive.exists():
        say(f"downloading the sdist of llama-cpp-python=={version}")
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--progress-bar", "off", "-d", str(folder), f"llama-cpp-python=={version}"],
            check=True,
        )  # fmt: skip
    say(f"unpacking {archive.name}")
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE / "src", filter="data")
    return tree


def cmake_cache(build_dir: Path) -> dict[str, str]:
    """``NAME`` -> value of a configured build folder's CMakeCache.txt."""
    values = {}
    for line in (build_dir / "CMakeCache.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z_][\w.-]*):[A-Z]+=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2)
    return values


def check_reusable(build_dir: Path, version: str, flags: BuildFlags) -> Path:
    """The llama.cpp source of ``build_dir`` if it is this version's, built by the same
    compilers; else an error. Flags that differ are only reported: configuring the
    folder with ours recompiles what they change (ggml-cpu, say), not everything."""
    values = cmake_cache(build_dir)
    source = Path(values.get("CMAKE_HOME_DIRECTORY", ""))
    problems = []
    if f"llama_cpp_python-{version}" not in str(source):
        problems.append(f"its source {source} is not llama-cpp-python {version}'s")
    for var, compiler in (("CMAKE_C_COMPILER", flags.cc), ("CMAKE_CXX_COMPILER", flags.cxx)):
        found = shutil.which(compiler)
        if found and Path(values.get(var, "")).resolve() != Path(found).resolve():
            problems.append(f"{var} is {values.get(var)}, not {found}")
    if problems:
        raise SystemExit(f"cannot reuse {build_dir}: " + "; ".join(problems))
    for arg in flags.all_args:
        name, _, value = arg.removeprefix("-D").partition("=")
        if values.get(name, "") != value:
            say(f"reconfiguring {build_dir.name}: {name} {values.get(name)!r} -> {value!r}")
    return source


def run_logged(command: list[str], log: Path, env: dict[str, str]) -> None:
    """Run ``command``, its output to ``log``; progress lines ("[ 42%] ...") to stdout."""
    with log.open("a") as out:
        out.write(f"\n$ {shlex.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            for line in proc.stdout:
                out.write(line)
                if PROGRESS.match(line):
                    say(line.rstrip())
        finally:
            code = proc.wait()
    if code:
        raise SystemExit(f"{command[0]} failed ({code}); see {log}")


def linked_libraries(binary: Path, build_dir: Path) -> list[Path]:
    """The shared libraries ``binary`` loads from ``build_dir`` (ldd), with their links."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    found = []
    for m in re.finditer(r"=>\s+(\S+)", out):
        path = Path(m.group(1))
        if path.resolve().is_relative_to(build_dir.resolve()):
            found.append(path)
    return found


def build(build_dir: Path | None = None, jobs: int = 2) -> Path:
    """The cached llama-server binary for the installed llama-cpp-python; built if missing."""
    version = installed_version()
    flags = makefile_flags()
    key = cache_key(version, flags)
    target = CACHE / "llama-server" / f"{version}-{key}"
    binary = target / "llama-server"
    if binary.exists():
        return binary
    say(f"building llama-server of llama-cpp-python {version} (llama.cpp it vendors)")
    say(f"CMake flags: {shlex.join(flags.all_args)}; compilers {flags.cc}, {flags.cxx}")
    if build_dir is not None:
        source = check_reusable(build_dir, version, flags)
        say(f"reusing the configured build folder {build_dir}")
    else:
        source = sdist_source(version)
        build_dir = CACHE / "build" / f"{version}-{key}"
    target.mkdir(parents=True, exist_ok=True)
    log = target / "build.log"
    env = {**os.environ, "CC": flags.cc, "CXX": flags.cxx}
    started = time.monotonic()
    say(f"configuring (log: {log})")
    run_logged(
        ["cmake", "-S", str(source), "-B", str(build_dir), *flags.all_args], log, env
    )  # fmt: skip
    say(f"compiling the llama-server target with {jobs} jobs (several minutes on 2 cores)")
    run_logged(
        ["nice", "-n", "10", "cmake", "--build", str(build_dir), "--target", "llama-server",
         "-j", str(jobs)],
        log, env,
    )  # fmt: skip
    built = build_dir / "bin" / "llama-server"
    for lib in linked_libraries(built, build_dir):
        # The library and the links to it (libllama.so.0 -> libllama.so.0.5.0).
        for path in lib.parent.glob(lib.name.split(".so")[0] + ".so*"):
            shutil.copy2(path, target / path.name, follow_symlinks=False)
    shutil.copy2(built, target / ".llama-server.tmp")
    info = {
        "llama_cpp_python": version,
        "cmake_args": flags.all_args,
        "cc": flags.cc,
        "cxx": flags.cxx,
        "source": str(source),
        "build_dir": str(build_dir),
        "built_s": round(time.monotonic() - started, 1),
    }
    (target / "BUILD_INFO.json").write_text(json.dumps(info, indent=2))
    (target / ".llama-server.tmp").replace(binary)  # last: a present binary is a complete one
    say(f"built in {info['built_s']:.0f} s: {binary}")
    return binary


def server_env(binary: Path) -> dict[str, str]:
    """The environment to run ``binary`` with: its own copies of the libraries first."""
    paths = [str(binary.parent), os.environ.get("LD_LIBRARY_PATH", "")]
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, paths))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--build-dir", type=Path, help="a build folder configured alike")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    parser.add_argument("--help-server", action="store_true", help="print llama-server --help")
    args = parser.parse_args()
    binary = build(args.build_dir, args.jobs)
    if args.help_server:
        subprocess.run([str(binary), "--help"], env=server_env(binary), check=False)
    print(binary)


if __name__ == "__main__":
    main()
