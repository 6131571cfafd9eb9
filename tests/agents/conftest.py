"""The agents tests' shared input: a region of EM to draw crops from."""

from __future__ import annotations

import numpy as np
import pytest

from neuroray.platform.volume import open_volume


@pytest.fixture(scope="module")
def em_region(em_raw) -> np.ndarray:
    """A FIB-SEM region, or synthetic EM without ../shared (uint8, z y x)."""
    volume = open_volume(em_raw.raw)
    return np.asarray(volume[0:24, 0:128, 0:128])
