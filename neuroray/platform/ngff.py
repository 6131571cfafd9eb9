"""OME-Zarr (OME-NGFF) metadata: what napari, Neuroglancer and ome-zarr read a zarr's voxel size
from.

neuroray writes each zarr layer as an OME-Zarr image: a group whose ``multiscales`` metadata
names the full-resolution array (path ``0``) and its scale in nanometres, NGFF 0.5 for zarr v3
(under the ``ome`` attribute) and 0.4 for zarr v2. Reading accepts both versions and any of the
spatial length units NGFF allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from neuroray.errors import VolumeError

#: NGFF version per zarr format.
NGFF_VERSIONS = {2: "0.4", 3: "0.5"}
FULL_RESOLUTION_PATH = "0"

#: NGFF's spatial units (UDUNITS-2 names) in nanometres.
UNIT_NM = {
    "angstrom": 0.1,
    "picometer": 1e-3,
    "nanometer": 1.0,
    "micrometer": 1e3,
    "millimeter": 1e6,
    "centimeter": 1e7,
    "meter": 1e9,
}


def multiscales_attributes(
    voxel_size: Sequence[float], *, num_channels: int, zarr_format: int, name: str
) -> dict[str, Any]:
    """Group attributes of a one-level OME-Zarr image with ``voxel_size`` (nm, z, y, x)."""
    version = NGFF_VERSIONS[zarr_format]
    axes: list[dict[str, str]] = [
        {"name": axis, "type": "space", "unit": "nanometer"} for axis in "zyx"
    ]
    scale = [float(v) for v in voxel_size]
    if num_channels > 1:
        axes.insert(0, {"name": "c", "type": "channel"})
        scale.insert(0, 1.0)
    multiscale: dict[str, Any] = {
        "name": name,
        "axes": axes,
        "datasets": [
            {
                "path": FULL_RESOLUTION_PATH,
                "coordinateTransformations": [{"type": "scale", "scale": scale}],
            }
        ],
    }
    if version == "0.4":
        return {"multiscales": [{"version": version, **multiscale}]}
    return {"ome": {"version": version, "multiscales": [multiscale]}}


def read_multiscales(attrs: Mapping[str, Any], url: str) -> tuple[str, tuple[float, ...]]:
    """From a group's attributes: (path of the full-resolution array, its voxel size in nm
    z, y, x). Axes must be z, y, x, optionally after a channel axis (neuroray's C, z, y, x).
    Raises a VolumeError naming what is missing or unsupported."""
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, Mapping) else None
    if not multiscales:
        raise VolumeError(
            f"{url} is a zarr group without OME-Zarr 'multiscales' metadata; "
            "give the path of an array inside it"
        )
    multiscale = multiscales[0]
    axes = multiscale.get("axes") or [{"name": a, "type": "space"} for a in "zyx"]
    axes = [{"name": a} if isinstance(a, str) else a for a in axes]  # NGFF 0.3 lists names
    dataset = multiscale["datasets"][0]
    scale = [1.0] * len(axes)
    for transforms in (
        dataset.get("coordinateTransformations", []),
        multiscale.get("coordinateTransformations", []),
    ):
        for transform in transforms:
            if transform.get("type") == "scale" and "scale" in transform:
                scale = [a * float(b) for a, b in zip(scale, transform["scale"], strict=True)]
    names = [axis["name"] for axis in axes]
    if names[-3:] != ["z", "y", "x"] or len(names) > 4:
        raise VolumeError(
            f"{url}: OME-Zarr axes {names} are not supported; neuroray reads z, y, x or c, z, y, x"
        )
    spatial = {name: i for i, name in enumerate(names)}
    voxel_size = []
    for name in "zyx":
        axis = axes[spatial[name]]
        unit = axis.get("unit") or "nanometer"
        if unit not in UNIT_NM:
            raise VolumeError(f"{url}: OME-Zarr axis {name} has unit {unit!r}, not a length")
        voxel_size.append(scale[spatial[name]] * UNIT_NM[unit])
    return str(dataset["path"]), tuple(voxel_size)
