"""Shared fixtures: the real data folder and one Ray session for the whole test run."""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    return Path(os.environ.get("NEURORAY_DATA") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real EM / LM data (../shared/data). Skips when absent, fails when CI requires it."""
    root = _data_root()
    if not (root / "em").is_dir():
        message = f"real data folder {root} is absent (set NEURORAY_DATA)"
        if os.environ.get("NEURORAY_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for all tests: 2 CPUs, dashboard on 127.0.0.1, a bounded object store."""
    import ray

    from neuroray import runtime

    runtime.connect(num_cpus=2, object_store_mb=768, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _held_cpus(ray) -> float:
    return ray.cluster_resources().get("CPU", 0.0) - ray.available_resources().get("CPU", 0.0)


def _idle_within(ray, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _held_cpus(ray) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    return _held_cpus(ray) <= 0


def _release_leaks(ray) -> list[str]:
    """Kill actors and remove placement groups that still hold CPUs; returns what was freed."""
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_actors, list_placement_groups

    address = ray.get_runtime_context().gcs_address  # not auto-detection: other Rays may run here
    freed = []
    for actor in list_actors(address, filters=[("state", "=", "ALIVE")], detail=True):
        if (actor.required_resources or {}).get("CPU", 0) > 0:
            freed.append(f"actor {actor.class_name}")
            core_worker = ray._private.worker.global_worker.core_worker  # unnamed: no handle
            core_worker.kill_actor(ray.ActorID.from_hex(actor.actor_id), True)
    for group in list_placement_groups(address, filters=[("state", "=", "CREATED")], detail=True):
        freed.append(f"placement group {group.name or group.placement_group_id[:8]}")
        group_id = ray.PlacementGroupID.from_hex(group.placement_group_id)
        ray.util.remove_placement_group(PlacementGroup(group_id))
    return freed


@pytest.fixture(autouse=True)
def _ray_released(request):
    """After each test the shared Ray must be idle again. A test that leaves actors or placement
    groups holding CPUs would starve every later Train / Tune test, which would then wait for
    resources forever; the leak is reported as a warning and freed so the run goes on."""
    yield
    ray = sys.modules.get("ray")  # only tests that imported Ray can have left it busy
    if ray is None or not ray.is_initialized():
        return
    if not _idle_within(ray, 30):
        freed = _release_leaks(ray)
        _idle_within(ray, 30)
        warnings.warn(f"{request.node.nodeid} left CPUs held; freed {freed}", stacklevel=1)
