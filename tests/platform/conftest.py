"""The platform tests' shared inputs: fib_gala_train as chunked layers, and chunk servers on it."""

from __future__ import annotations

import pytest

from neuroray.platform.ingest import ingest
from neuroray.platform.server import ServerPool
from neuroray.platform.volume import open_volume


@pytest.fixture(scope="session")
def gala_chunks() -> tuple[int, int, int]:
    """The chunk shape the gala layers are written with (several chunks per axis)."""
    return (16, 32, 64)


@pytest.fixture(scope="session")
def gala(em_volume, gala_chunks, tmp_path_factory):
    """fib_gala_train (or synthetic EM of its shape) ingested as precomputed image +
    segmentation layers (0 = boundary)."""
    root = tmp_path_factory.mktemp("gala")
    layers = {}
    for name in ("raw", "labels"):
        dst = str(root / name)
        ingest(getattr(em_volume, name), dst, chunk_shape=gala_chunks, progress=False)
        layers["image" if name == "raw" else "labels"] = dst
    arrays = {key: open_volume(url)[:] for key, url in layers.items()}
    return layers, arrays


@pytest.fixture(scope="module", params=["chunks", "crops"])
def pool(request, ray_session, gala, gala_chunks):
    """Two chunk servers on the gala layers, serving whole chunks or assembled crops."""
    layers, _ = gala
    pool = ServerPool(
        layers, num_servers=2, cache_mb=4, mode=request.param, block_shape=gala_chunks
    )
    yield pool
    pool.shutdown()
