"""Starting the head's two named actors: the controller and the library service.

Both are detached (they outlive the ``corral serve`` that started them; the next one
adopts them), pinned to the node ``corral serve`` runs on (the head, usually: not a
box that may be unplugged), take no CPU, and come back if their process dies. A
crashed controller reads its state back from disk, and the calls that waited on it
go through; ``RunningCorral.stop`` kills both for good.
"""

from __future__ import annotations

import ray

from cluster.controller import Controller
from cluster.library_service import LibraryService
from cluster.settings import CorralSettings
from deployments.actors import CONTROLLER_ACTOR, LIBRARY_ACTOR, NAMESPACE


def start_head_actors(settings: CorralSettings, node_labels: dict[str, str] | None = None) -> None:
    """Start the controller and the library service (or find those running) on the node
    ``node_labels`` select, and wait until both answer."""
    controller = _start(Controller, CONTROLLER_ACTOR, settings, node_labels, max_task_retries=2)
    library = _start(LibraryService, LIBRARY_ACTOR, settings, node_labels)
    ray.get([controller.ping.remote(), library.ping.remote()])


def _start(
    cls: type, name: str, settings: CorralSettings, node_labels: dict[str, str] | None, **more
) -> ray.actor.ActorHandle:
    return (
        ray.remote(cls)
        .options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            label_selector=node_labels or {},
            max_restarts=-1,
            **more,
        )
        .remote(settings)
    )
