"""Where a replica runs: its node and the logical GPUs Ray gave it (for packing checks and ops)."""

from __future__ import annotations

import os
from typing import Any


def replica_placement() -> dict[str, Any]:
    """This process' node id, accelerator ids (``{"GPU": ["0"]}``), Serve replica id and pid."""
    import ray

    context = ray.get_runtime_context()
    replica: str | None = None
    deployment: str | None = None
    try:
        from ray import serve

        replica_context = serve.get_replica_context()
        replica, deployment = replica_context.replica_id.unique_id, replica_context.replica_id.deployment_id.name
    except Exception:  # not inside a Serve replica (a plain actor or the driver)
        pass
    return {
        "deployment": deployment,
        "replica": replica,
        "node_id": context.get_node_id(),
        "accelerator_ids": {kind: list(ids) for kind, ids in context.get_accelerator_ids().items() if ids},
        "pid": os.getpid(),
    }
