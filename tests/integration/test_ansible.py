"""Provisioning with Ansible: the playbook lints, parses, and really installs Corral.

The real run targets this machine (``ansible_connection=local``) in test mode
(``corral_manage_system: false``): no packages, users, services or firewall
changes, every path under a temporary prefix. Two inventory hosts share it, a
head and a worker, each with its own prefix and one shared virtualenv (so Corral
is installed once: the worker finds it there). Corral comes from a wheel of
this checkout, its dependencies from the package index through pip's cache.
No Ray is started.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cluster.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"
# Never created (nothing starts Ray); short enough for Ray's socket paths, which
# `corral node start --dry-run` checks.
RAY_TEMP_DIR = "/tmp/corral-ansible-ray"
PINNED = {  # roles/corral/defaults/main.yml: corral_ray_ports
    "node_manager_port": 6380,
    "object_manager_port": 6381,
    "metrics_export_port": 52368,
    "dashboard_agent_grpc_port": 52366,
    "runtime_env_agent_port": 52367,
}


def ansible(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """An Ansible tool of this virtualenv, run in ansible/ (so ansible.cfg applies)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "NO_COLOR": "1"}
    env["ANSIBLE_NOCOLOR"] = "1"
    out = subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=ANSIBLE, env=env, capture_output=True, text=True
    )
    if check:
        assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def test_ansible_lint_passes_with_the_production_profile():
    out = ansible("ansible-lint", "--profile", "production", "--offline", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Profile 'production' was required, and it passed" in out.stdout + out.stderr


def test_the_playbook_parses():
    out = ansible("ansible-playbook", "--syntax-check", "-i", "inventory.example.yml", "site.yml")
    assert "playbook: site.yml" in out.stdout


def test_the_role_builds_the_llama_cpp_python_that_corral_pins():
    defaults = yaml.safe_load((ANSIBLE / "roles/corral/defaults/main.yml").read_text())
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"llama-cpp-python=={defaults['corral_llama_version']}" in pins


@dataclass
class Provisioned:
    root: Path
    venv: Path
    token_source: Path
    inventory: Path

    def prefix(self, host: str) -> Path:
        return self.root / host

    def config(self, host: str) -> Path:
        return self.prefix(host) / "etc/corral/corral.yaml"

    def unit(self, host: str, name: str) -> Path:
        return self.prefix(host) / "etc/systemd/system" / name


def build_wheel(into: Path) -> None:
    """A wheel of this checkout, built from a copy (setuptools leaves build/ behind)."""
    src = into.parent / "src"
    src.mkdir()
    for name in ("cluster", "deployments", "nodes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(into), str(src)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, f"pip wheel failed:\n{out.stdout}\n{out.stderr}"


def site_inventory(root: Path, wheels: Path) -> dict:
    """A head and a worker, both this machine, each under its own prefix."""
    common = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "corral_manage_system": False,
        "corral_version": VERSION,
        "corral_python": sys.executable,
        "corral_pip_find_links": str(wheels),
        "corral_venv": str(root / "venv"),
        "corral_token_source": str(root / "control" / "ray-token"),
        "corral_ray_temp_dir": RAY_TEMP_DIR,
        "corral_firewall_lan_cidrs": ["192.168.1.0/24", "fd00::/8"],
    }
    head = {"corral_prefix": str(root / "head"), "corral_node_ip": HEAD_IP}
    worker = {
        "corral_prefix": str(root / "worker"),
        "corral_node_ip": WORKER_IP,
        "corral_reserve_ram": "1GiB",
    }
    corral = {
        "vars": common,
        "children": {
            "corral_head": {"hosts": {"head": head}},
            "corral_workers": {"hosts": {"worker": worker}},
        },
    }
    return {"all": {"children": {"corral": corral}}}


def run_site(inventory: Path) -> subprocess.CompletedProcess[str]:
    # One host at a time: both install into the one virtualenv.
    return ansible("ansible-playbook", "-i", str(inventory), "--forks", "1", "site.yml")


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory) -> Provisioned:
    root = tmp_path_factory.mktemp("ansible")
    wheels = root / "wheels-built"
    build_wheel(wheels)
    inventory = root / "inventory.yml"
    inventory.write_text(yaml.safe_dump(site_inventory(root, wheels)))
    started = time.monotonic()
    run_site(inventory)
    print(f"\nsite.yml, first run (a fresh virtualenv): {time.monotonic() - started:.0f} s")
    yield Provisioned(root, root / "venv", root / "control" / "ray-token", inventory)
    shutil.rmtree(root, ignore_errors=True)


def exec_start(unit: Path) -> str:
    lines = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")]
    assert len(lines) == 1, unit.read_text()
    return lines[0].removeprefix("ExecStart=")


def test_corral_is_installed_at_the_pinned_version(provisioned):
    out = subprocess.run(
        [provisioned.venv / "bin/corral", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"corral {VERSION}"
    # llama-cpp-python from the role's own build, one per set of flags (see install.yml)
    assert len(list(provisioned.venv.glob(".llama-*"))) == 1


def test_the_units_run_corral_node_start(provisioned):
    corral = provisioned.venv / "bin/corral"
    head_config, worker_config = provisioned.config("head"), provisioned.config("worker")
    assert exec_start(provisioned.unit("head", "corral-node.service")) == (
        f"{corral} node start --head --block --config {head_config}"
    )
    assert exec_start(provisioned.unit("worker", "corral-node.service")) == (
        f"{corral} node start --address {HEAD_IP}:6379 --block --config {worker_config}"
    )
    # The API runs on the head only, with its node.
    api = provisioned.unit("head", "corral.service")
    assert exec_start(api) == f"{corral} serve --config {head_config}"
    assert "Requires=corral-node.service" in api.read_text()
    assert not provisioned.unit("worker", "corral.service").exists()


def test_every_box_has_the_one_token_mode_600(provisioned):
    token = provisioned.token_source.read_text().strip()
    assert re.fullmatch(r"[a-z0-9]{64}", token)
    for host in ("head", "worker"):
        path = provisioned.prefix(host) / "var/lib/corral/ray-token"
        assert path.read_text() == token
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_corral_yaml_is_valid_corral_settings(provisioned):
    head = load_settings(provisioned.config("head"))
    assert head.host == "0.0.0.0:11434"
    assert head.state_path == provisioned.prefix("head") / "var/lib/corral"
    assert (head.node.name, head.node.node_ip) == ("head", HEAD_IP)
    assert {k: getattr(head.node, k) for k in PINNED} == PINNED
    assert (head.node.min_worker_port, head.node.max_worker_port) == (10002, 19999)
    worker = load_settings(provisioned.config("worker"))
    assert (worker.node.name, worker.node.node_ip) == ("worker", WORKER_IP)
    assert worker.node.reserve_ram == 1024**3


def test_the_installed_corral_takes_the_config(provisioned):
    """What the unit would start, planned by the installed Corral: Ray with the pinned ports."""
    out = subprocess.run(
        [
            provisioned.venv / "bin/corral",
            "node",
            "start",
            "--address",
            f"{HEAD_IP}:6379",
            "--config",
            provisioned.config("worker"),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    ray_start = out.stdout.strip().splitlines()[-1]
    assert f"--address={HEAD_IP}:6379" in ray_start
    assert f"--node-ip-address={WORKER_IP}" in ray_start
    for name, port in PINNED.items():
        assert f"--{name.replace('_', '-')}={port}" in ray_start
    assert "--min-worker-port=10002" in ray_start and "--max-worker-port=19999" in ray_start


def test_the_roles_pin_every_port_a_node_can_pin():
    """A port setting Corral gains must reach the roles (and so the firewall) too."""
    from nodes.agent import NodeSettings

    settings = {n for n in NodeSettings.model_fields if n == "port" or n.endswith("_port")}
    defaults = yaml.safe_load((ANSIBLE / "roles/corral/defaults/main.yml").read_text())
    assert set(defaults["corral_ray_ports"]) == settings
    assert {k: v for k, v in defaults["corral_ray_ports"].items() if k in PINNED} == PINNED


def test_the_roles_give_the_rpc_workers_the_range_the_firewall_names():
    from cluster.settings import CorralSettings

    defaults = yaml.safe_load((ANSIBLE / "roles/corral/defaults/main.yml").read_text())
    assert tuple(defaults["corral_rpc_ports"]) == CorralSettings().rpc_ports


def dropped_ports(nft: str) -> set[str]:
    """The ports of the rule that drops Ray's ports from everyone else."""
    (ports,) = re.findall(r"tcp dport \{ ([^}]*) \} drop", nft)
    return {p.strip() for p in ports.split(",")}


def test_the_firewall_names_the_api_and_every_ray_port(provisioned):
    head = (provisioned.prefix("head") / "etc/corral/corral.nft").read_text()
    worker = (provisioned.prefix("worker") / "etc/corral/corral.nft").read_text()
    ray_ports = {"6379", "10001", "8265", "52365", "44217", "44227", "10002-19999"}
    ray_ports.add("50052-50067")  # llama.cpp's RPC workers (no authentication)
    ray_ports |= {str(p) for p in PINNED.values()}
    for nft in (head, worker):
        assert dropped_ports(nft) == ray_ports
        assert f"elements = {{ {HEAD_IP}, {WORKER_IP} }}" in nft  # the cluster's boxes
        assert "policy accept;" in nft  # other ports are left alone
    # The API is on the head: open to the LAN, dropped for the rest.
    assert "tcp dport 11434 ip saddr @lan_v4 accept" in head
    assert "elements = { 192.168.1.0/24 }" in head and "elements = { fd00::/8 }" in head
    assert "tcp dport 11434 drop" in head
    assert "11434" not in worker
    for host in ("head", "worker"):
        unit = provisioned.unit(host, "corral-firewall.service").read_text()
        rules = provisioned.prefix(host) / "etc/corral/corral.nft"
        assert f"ExecStart=/usr/sbin/nft -f {rules}" in unit


def test_nft_accepts_the_firewall_rules(provisioned):
    nft = shutil.which("nft") or ("/usr/sbin/nft" if Path("/usr/sbin/nft").exists() else None)
    if nft is None or os.geteuid() != 0:
        pytest.skip("checking nftables rules needs nft and root")
    for host in ("head", "worker"):
        path = provisioned.prefix(host) / "etc/corral/corral.nft"
        out = subprocess.run([nft, "-c", "-f", str(path)], capture_output=True, text=True)
        if "Operation not permitted" in out.stderr:
            pytest.skip("nft -c needs CAP_NET_ADMIN, which this container lacks")
        assert out.returncode == 0, out.stderr


def test_a_second_run_changes_nothing(provisioned):
    out = run_site(provisioned.inventory)
    recap = dict(re.findall(r"^(\w+)\s+:.*?changed=(\d+)", out.stdout, re.M))
    assert recap == {"head": "0", "worker": "0"}, out.stdout


def test_the_playbook_pins_this_checkouts_version():
    """A new release updates the version the roles and the example inventory install."""
    defaults = yaml.safe_load((ANSIBLE / "roles/corral/defaults/main.yml").read_text())
    example = yaml.safe_load((ANSIBLE / "inventory.example.yml").read_text())
    corral = example["all"]["children"]["corral"]
    assert defaults["corral_version"] == corral["vars"]["corral_version"] == VERSION
    (head,) = corral["children"]["corral_head"]["hosts"].values()
    assert "corral_node_ip" in head and len(corral["children"]["corral_workers"]["hosts"]) == 2
