"""Shared fixtures: the end-to-end tests' inputs (real data or synthetic) and one Ray session.

Every end-to-end test gets its inputs from a fixture below that hands over the real files of
``../shared/data`` (or ``$NEURORAY_DATA``) when they are there, as in CI, and otherwise volumes
of the same layout generated once per session by :mod:`neuroray.platform.synthetic`, so a fresh
clone's ``make test`` runs every component. Each input has a ``real`` flag: assertions about the
real data's specifics (shapes, voxel sizes, published numbers) run under ``if volume.real:``.
Tests that make sense only on real ground truth use :func:`real_file`, which skips naming the
file (or fails when ``NEURORAY_REQUIRE_DATA=1``, as in CI).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    return Path(os.environ.get("NEURORAY_DATA") or REPO.parent / "shared" / "data").resolve()


def _missing(message: str) -> None:
    if os.environ.get("NEURORAY_REQUIRE_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _real_path(relative: str) -> Path | None:
    """``<data root>/relative`` when the real data is there; None (synthetic stands in) when the
    data folder is absent; a failure under NEURORAY_REQUIRE_DATA=1 when the file is missing."""
    path = _data_root() / relative
    if path.is_file():
        return path
    if os.environ.get("NEURORAY_REQUIRE_DATA") == "1":
        pytest.fail(f"real data file {path} is missing (NEURORAY_REQUIRE_DATA=1)")
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real EM / LM data (../shared/data). Skips when absent, fails when CI requires it."""
    root = _data_root()
    if not (root / "em").is_dir():
        _missing(f"needs the real data folder {root} (set NEURORAY_DATA)")
    return root


def real_file(relative: str) -> Path:
    """A real data file a test cannot do without (real ground truth, published numbers): skips
    naming it when absent, fails when NEURORAY_REQUIRE_DATA=1."""
    path = _data_root() / relative
    if not path.is_file():
        _missing(f"needs the real data file {path} (set NEURORAY_DATA)")
    return path


@pytest.fixture(scope="session")
def real_data():
    """:func:`real_file` as a fixture: ``real_data("em/fib_gala_train.h5")``."""
    return real_file


# ------------------------------------------------------------------ end-to-end inputs
@dataclass(frozen=True)
class EMVolume:
    """EM image (and labels) as HDF5 URLs ``file.h5#dataset``; ``region`` is the z, y, x part of
    them a test uses (the whole volume unless the real file is larger than the test needs)."""

    raw: str
    labels: str | None
    real: bool
    region: tuple[slice, slice, slice] = (slice(None),) * 3


@dataclass(frozen=True)
class LMStack:
    """A fluorescence TIFF stack and its SWC tracing, DIADEM style."""

    tif: Path
    swc: Path
    real: bool


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic_data")


def _synthetic_em_h5(path: Path, **settings) -> Path:
    """synth_em written as the real EM files are: raw, labels, mito and resolution_nm_zyx."""
    import h5py

    from neuroray.platform.synthetic import synth_em

    if not path.is_file():
        em = synth_em(**settings)
        with h5py.File(path, "w") as f:
            f.create_dataset("raw", data=em.raw, chunks=True)
            f.create_dataset("labels", data=em.labels, chunks=True)
            f.create_dataset("mito", data=em.mito.astype(np.uint8), chunks=True)
            f.attrs["resolution_nm_zyx"] = np.asarray(em.voxel_size)
            f.attrs["axis_order"] = "zyx"
    return path


@pytest.fixture(scope="session")
def em_volume(synthetic_dir) -> EMVolume:
    """Labelled EM the shape of fib_gala_train (50, 100, 200; 10 nm; label 0 on ~7% boundary
    voxels): the real file, or synth_em with boundary gaps at the same shape and voxel size."""
    real = _real_path("em/fib_gala_train.h5")
    path = real or _synthetic_em_h5(
        synthetic_dir / "em_gala_like.h5",
        shape=(50, 100, 200), seed=0, voxel_size=(10.0, 10.0, 10.0), boundary_gap=True,
    )
    return EMVolume(f"{path}#raw", f"{path}#labels", real=real is not None)


def _synthetic_cube(synthetic_dir: Path) -> Path:
    return _synthetic_em_h5(
        synthetic_dir / "em_cube.h5", shape=(64, 128, 128), seed=1, voxel_size=(10.0, 10.0, 10.0)
    )


@pytest.fixture(scope="session")
def em_raw(synthetic_dir) -> EMVolume:
    """Unlabelled EM for pretraining: the 250^3 FIB-SEM cube fib_medulla_s1_raw, or a synthetic
    64 x 128 x 128 one (every test crops inside z < 64, y, x < 128)."""
    real = _real_path("em/fib_medulla_s1_raw.h5")
    path = real or _synthetic_cube(synthetic_dir)
    return EMVolume(f"{path}#raw", None, real=real is not None)


@pytest.fixture(scope="session")
def em_dense(synthetic_dir) -> EMVolume:
    """Densely labelled touching neurons, 64 x 128 x 128: fib_medulla_s2's labels at z 100-164,
    y, x 0-128, or the synthetic cube's complete tessellation."""
    real = _real_path("em/fib_medulla_s2.h5")
    if real is not None:
        region = (slice(100, 164), slice(0, 128), slice(0, 128))
        return EMVolume(f"{real}#raw", f"{real}#labels", real=True, region=region)
    path = _synthetic_cube(synthetic_dir)
    return EMVolume(f"{path}#raw", f"{path}#labels", real=False)


@pytest.fixture(scope="session")
def mito_volume(synthetic_dir) -> EMVolume:
    """EM with mitochondria labels (``labels`` is the binary mito mask), 20 x 192 x 192 at
    50 x 4.6 x 4.6 nm: vnc_stack1_mito's raw / mitochondria at y, x 256-448, or synth_em."""
    real = _real_path("em/vnc_stack1_mito.h5")
    if real is not None:
        region = (slice(0, 20), slice(256, 448), slice(256, 448))
        return EMVolume(f"{real}#raw", f"{real}#mitochondria", real=True, region=region)
    path = _synthetic_em_h5(
        synthetic_dir / "em_mito.h5", shape=(20, 192, 192), seed=2, voxel_size=(50.0, 4.6, 4.6)
    )
    return EMVolume(f"{path}#raw", f"{path}#mito", real=False)


@pytest.fixture(scope="session")
def lm_stack(synthetic_dir) -> LMStack:
    """One LM stack with its tracing: DIADEM OP_1 (60 x 512 x 512), or synth_lm 32 x 128 x 128."""
    real_tif, real_swc = _real_path("lm/OP_1.tif"), _real_path("lm/OP_1.swc")
    if real_tif is not None and real_swc is not None:
        return LMStack(real_tif, real_swc, real=True)
    from neuroray.platform.synthetic import write_synthetic

    urls = write_synthetic("lm", synthetic_dir / "lm", shape=(32, 128, 128), seed=0)
    return LMStack(Path(urls["image"]), Path(urls["swc"]), real=False)


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
