"""Connect to Ray: an embedded local instance by default, a cluster when an address is given.

The dashboard stays on (bound to 127.0.0.1 locally): without it Ray's State API is missing and
Tune over Train hangs (see RAY_NOTES.md). Train's report poll is shortened for local runs, where
the default 2 s poll pads every short step.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Train V2 polls workers every 2 s by default, which pads short steps; 0.2 s is plenty locally.
_LOCAL_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_mb: int | None = 512,
    log_to_driver: bool = True,
) -> dict:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start an embedded one.

    Idempotent: when Ray is already initialised in this process it is reused as it is.
    Returns the cluster's resources.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        for key, value in _LOCAL_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
            log_to_driver=log_to_driver,
            runtime_env={"env_vars": dict(_LOCAL_ENV_DEFAULTS)},
        )
    return ray.cluster_resources()


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
