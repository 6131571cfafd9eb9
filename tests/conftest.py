"""Shared fixtures: the real data folder and one Ray session for the whole test run."""

from __future__ import annotations

import os
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
