"""``corral nodes``: the table of the cluster's boxes."""

from __future__ import annotations

from rich.console import Console

import cluster.cli  # noqa: F401  (first: it imports the command modules in order)
from cluster.cli_nodes import nodes_table
from deployments.views import NodeStatus


def render(statuses: list[NodeStatus]) -> str:
    console = Console(width=200, record=True)
    console.print(nodes_table(statuses))
    return console.export_text()


def test_the_table_shows_each_boxs_cpu_kernels():
    labels = {"corral.node": "xeon", "corral.role": "head", "corral.cpu_kernels": "amx-repack"}
    xeon = NodeStatus(
        name="xeon", node_id="n1", address="10.0.0.1", role="head", state="up", labels=labels
    )
    old = NodeStatus(name="old", node_id="n2", address="10.0.0.2", role="worker", state="up")
    lines = render([xeon, old]).splitlines()
    header = next(line for line in lines if "CPU kernels" in line)
    column = header.index("CPU kernels")
    assert next(line for line in lines if "xeon" in line)[column:].startswith("amx-repack")
    assert next(line for line in lines if "old" in line)[column:].startswith("-")  # no label
