"""The ``corral`` command: the app of ``cluster/cli_app.py`` with every command module's
commands on it.

Importing a command module registers its commands, in the order ``corral --help``
lists them: serve, the model library (pull, list, show, rm, cp, create, stop), run,
nodes, plan and apply, ps; then the groups, keys and node.
"""

from __future__ import annotations

from cluster.cli_app import app

# The order is the help's, so the import sorter keeps out.
# isort: off
from cluster import cli_serve, cli_keys, cli_models, cli_chat  # noqa: F401
from cluster import cli_nodes, cli_plan, cli_ps  # noqa: F401
# isort: on


def main() -> None:
    """The ``corral`` entry point."""
    app()


if __name__ == "__main__":
    main()
