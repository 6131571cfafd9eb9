"""The volume formats behind :func:`neuroray.platform.volume.open_volume`, one module each.

Importing this package registers every format in
:data:`~neuroray.platform.volume.VOLUME_FORMATS`; a new format is one more module here.
"""

from neuroray.platform.formats.hdf5 import HDF5Volume
from neuroray.platform.formats.npy import NpyVolume
from neuroray.platform.formats.precomputed import PrecomputedVolume
from neuroray.platform.formats.tiff import TiffVolume
from neuroray.platform.formats.zarr import ZarrVolume

__all__ = ["HDF5Volume", "NpyVolume", "PrecomputedVolume", "TiffVolume", "ZarrVolume"]
