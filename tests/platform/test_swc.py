"""SWC: read/write round trip, validation errors naming the line, resampling, rasterisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from neuroray.errors import SWCError
from neuroray.platform.swc import SWCTree, rasterize, read_swc, resample, write_swc
from neuroray.platform.synthetic import write_synthetic

OP_STACKS = [f"OP_{n}" for n in range(1, 7)]


def branching_tree() -> SWCTree:
    """A root, a trunk along x, and two branches from node 2 (z, y, x in voxels)."""
    zyx = [[5, 10, 4], [5, 10, 12], [5, 10, 20], [7, 16, 26], [3, 4, 27], [7, 20, 30]]
    return SWCTree.from_arrays(zyx, [-1, 0, 1, 2, 2, 3], radii=[3, 2.5, 2, 1.5, 1.5, 1.0])


def random_tree(rng: np.random.Generator, n: int, shape: tuple[int, int, int]) -> SWCTree:
    zyx = rng.uniform(2, np.asarray(shape) - 3, size=(n, 3))
    parent = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)])
    return SWCTree.from_arrays(zyx, parent, radii=rng.uniform(1.0, 3.0, n))


def assert_same_tree(a: SWCTree, b: SWCTree) -> None:
    for name in ("ids", "types", "xyz", "radii", "parents"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --------------------------------------------------------------------------- structure
def test_from_arrays_edges_and_zyx_follow_the_file_columns():
    tree = branching_tree()
    assert len(tree) == 6
    np.testing.assert_array_equal(tree.ids, np.arange(1, 7))
    np.testing.assert_array_equal(tree.parents, [-1, 1, 2, 3, 3, 4])
    np.testing.assert_array_equal(tree.xyz[0], [4, 10, 5])  # x, y, z as in the file
    np.testing.assert_array_equal(tree.zyx[0], [5, 10, 4])
    np.testing.assert_array_equal(tree.edges(), [[1, 0], [2, 1], [3, 2], [4, 2], [5, 3]])
    np.testing.assert_array_equal(tree.roots, [0])
    np.testing.assert_array_equal(tree.n_children(), [1, 1, 2, 1, 0, 0])


def test_positions_and_radii_in_nanometres_for_both_coordinate_conventions():
    tree = branching_tree()
    size = (1000.0, 330.0, 330.0)
    nm = tree.positions_nm(size, coords="voxel")
    np.testing.assert_allclose(nm[0], [5000.0, 3300.0, 1320.0])
    np.testing.assert_allclose(tree.radii_nm(size, coords="voxel")[0], 3 * 330.0)
    in_um = SWCTree(tree.ids, tree.types, nm[:, ::-1] / 1000, tree.radii * 0.33, tree.parents)
    np.testing.assert_allclose(in_um.positions_nm(size, coords="physical", unit_nm=1000), nm)
    np.testing.assert_allclose(in_um.positions_voxel(size, coords="physical"), tree.zyx)
    with pytest.raises(SWCError, match="coords"):
        tree.positions_nm(size, coords="pixels")  # type: ignore[arg-type]


def test_from_edges_orients_a_skeleton_graph_and_rejects_cycles():
    zyx = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 1], [5, 5, 5], [5, 5, 6]], float)
    edges = np.array([[1, 0], [2, 1], [3, 1], [5, 4]])
    tree = SWCTree.from_edges(zyx, edges, radii=np.arange(6) + 1.0)
    assert len(tree.roots) == 2
    parent = tree.parent_index
    assert np.all(parent < np.arange(len(tree)))  # parents come first
    oriented = {tuple(sorted(map(tuple, tree.zyx[list(e)]))) for e in tree.edges()}
    expected = {tuple(sorted(map(tuple, zyx[list(e)]))) for e in edges}
    assert oriented == expected
    for position, radius in zip(tree.zyx, tree.radii, strict=True):
        assert radius == 1.0 + np.flatnonzero(np.all(zyx == position, axis=1))[0]
    cyclic = np.vstack([edges, [[2, 3]]])
    with pytest.raises(SWCError, match="cycle"):
        SWCTree.from_edges(zyx, cyclic)
    assert len(SWCTree.from_edges(zyx, cyclic, break_cycles=True).edges()) == 4


# --------------------------------------------------------------------------- file I/O
def test_write_then_read_round_trips_exactly(tmp_path):
    tree = branching_tree()
    tree = SWCTree(tree.ids * 3, [1, 2, 3, 3, 4, 2], tree.xyz / 7, tree.radii / 3, tree.parents * 3)
    path = tmp_path / "sub" / "tree.swc"
    write_swc(tree, path, comment="made by a test")
    assert_same_tree(read_swc(path), tree)
    assert [p.name for p in path.parent.iterdir()] == ["tree.swc"]  # no temporary left behind


def test_tracing_round_trips(lm_stack, tmp_path):
    """DIADEM OP_1's gold tracing where the data is, synth_lm's tree otherwise."""
    tree = read_swc(lm_stack.swc)
    assert len(tree.roots) == 1
    if lm_stack.real:
        assert len(tree) == 1496
    write_swc(tree, tmp_path / "op1.swc")
    assert_same_tree(read_swc(tmp_path / "op1.swc"), tree)


HEADER = "# a comment line\n\n"
GOOD = ["1 1 0 0 0 2 -1", "2 3 1 0 0 1.5 1", "3 3 2 0 0 1.5 2"]
MALFORMED = {
    # name: (lines after the header, line number the error must name, words it must contain)
    "duplicate id": (GOOD + ["2 3 3 0 0 1 1"], 6, "duplicate node id 2"),
    "dangling parent": (GOOD + ["4 3 3 0 0 1 9"], 6, "parent 9"),
    "cycle": (GOOD + ["4 3 0 1 0 1 5", "5 3 0 2 0 1 4"], 6, "cycle"),
    "self parent": (GOOD + ["4 3 0 1 0 1 4"], 6, "cycle"),
    "zero radius": (GOOD + ["4 3 0 1 0 0 1"], 6, "radius 0"),
    "negative radius": (GOOD + ["4 3 0 1 0 -1 1"], 6, "radius -1"),
    "too few columns": (GOOD + ["4 3 0 1 0 1"], 6, "expected 7 columns"),
    "too many columns": (GOOD + ["4 3 0 1 0 1 1 7"], 6, "expected 7 columns"),
    "not a number": (GOOD[:1] + ["2 3 x 0 0 1 1"], 4, "column 'x' is not a number"),
    "fractional id": (GOOD[:1] + ["2.5 3 0 0 0 1 1"], 4, "must be an integer"),
    "infinite position": (GOOD + ["4 3 inf 1 0 1 1"], 6, "finite"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_swc_raises_an_error_naming_file_and_line(tmp_path, case):
    lines, line_number, words = MALFORMED[case]
    path = tmp_path / "bad.swc"
    path.write_text(HEADER + "\n".join(lines) + "\n")
    with pytest.raises(SWCError) as err:
        read_swc(path)
    assert f"{path}:{line_number}:" in str(err.value)
    assert words in str(err.value)


def test_zero_radius_is_accepted_on_request_but_negative_never(tmp_path):
    path = tmp_path / "zero.swc"
    path.write_text("\n".join(GOOD + ["4 3 0 1 0 0 1"]) + "\n")
    assert read_swc(path, allow_zero_radius=True).radii[-1] == 0
    path.write_text("\n".join(GOOD + ["4 3 0 1 0 -0.5 1"]) + "\n")
    with pytest.raises(SWCError, match=r"zero.swc:4:.*radius -0.5"):
        read_swc(path, allow_zero_radius=True)


def test_missing_and_empty_files_raise_swc_errors(tmp_path):
    with pytest.raises(SWCError, match="does not exist"):
        read_swc(tmp_path / "absent.swc")
    (tmp_path / "empty.swc").write_text("# only a comment\n")
    with pytest.raises(SWCError, match="no nodes"):
        read_swc(tmp_path / "empty.swc")


# --------------------------------------------------------------------------- resampling
def critical_structure(tree: SWCTree) -> set[tuple]:
    """Each root / branch point / tip with the nearest such node above it, by position."""
    parent, kids = tree.parent_index, tree.n_children()
    critical = (parent < 0) | (kids != 1)
    found = set()
    for node in np.flatnonzero(critical):
        up = parent[node]
        while up >= 0 and not critical[up]:
            up = parent[up]
        above = tuple(np.round(tree.xyz[up], 9)) if up >= 0 else None
        found.add((tuple(np.round(tree.xyz[node], 9)), above, int(kids[node])))
    return found


@pytest.mark.parametrize("step", [0.7, 2.0, 50.0])
def test_resample_keeps_critical_nodes_and_topology(step):
    tree = random_tree(np.random.default_rng(1), 40, (20, 60, 60))
    out = resample(tree, step)
    assert critical_structure(out) == critical_structure(tree)
    lengths = np.linalg.norm(out.xyz[out.edges()[:, 0]] - out.xyz[out.edges()[:, 1]], axis=1)
    assert lengths.max() <= step + 1e-9
    assert np.all(out.parent_index < np.arange(len(out)))
    np.testing.assert_array_equal(out.ids, np.arange(1, len(out) + 1))


def test_resample_straight_path_places_equally_spaced_nodes_with_interpolated_radii():
    tree = SWCTree.from_arrays([[0, 0, 0], [0, 0, 4], [0, 0, 10]], [-1, 0, 1], radii=[1, 2, 3])
    out = resample(tree, 1.0)
    np.testing.assert_allclose(out.xyz[:, 0], np.arange(11))
    np.testing.assert_allclose(
        out.radii, [1.0, 1.25, 1.5, 1.75, 2.0, 2 + 1 / 6, 2 + 2 / 6, 2.5, 2 + 4 / 6, 2 + 5 / 6, 3.0]
    )
    physical = resample(tree, 1.0, spacing_xyz=(0.5, 0.5, 0.5))  # x is now 5 units long
    assert len(physical) == 6


def test_resample_traced_tree_in_micrometres(lm_stack, real_data):
    """DIADEM OP_4 where the data is, synth_lm's tree (the same 0.33 x 0.33 x 1 um voxels)
    otherwise."""
    tree = read_swc(real_data("lm/OP_4.swc") if lm_stack.real else lm_stack.swc)
    out = resample(tree, 2.0, spacing_xyz=(0.33, 0.33, 1.0))
    assert critical_structure(out) == critical_structure(tree)
    steps = (out.xyz[out.edges()[:, 0]] - out.xyz[out.edges()[:, 1]]) * (0.33, 0.33, 1.0)
    assert np.linalg.norm(steps, axis=1).max() <= 2.0 + 1e-9


# --------------------------------------------------------------------------- rasterisation
def brute_force_mask(tree: SWCTree, shape, size) -> np.ndarray:
    """Reference: every voxel against every segment (cone with linear radius), in nm."""
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1) * np.asarray(size)
    pos = tree.zyx * size
    radius = tree.radii * size[2]
    mask = np.zeros(shape, dtype=bool)
    for child, par in list(tree.edges()) + [(r, r) for r in tree.roots]:
        a, d = pos[child], pos[par] - pos[child]
        t = np.clip(((grid - a) @ d) / max(d @ d, 1e-12), 0, 1)
        dist = np.linalg.norm(grid - a - t[..., None] * d, axis=-1)
        mask |= dist <= radius[child] + t * (radius[par] - radius[child])
    return mask


@pytest.mark.parametrize("size", [(1.0, 1.0, 1.0), (3.0, 1.0, 1.0)])
def test_rasterize_matches_a_brute_force_reference(size):
    tree = branching_tree()
    shape = (12, 26, 34)
    mask = rasterize(tree, shape, size)
    reference = brute_force_mask(tree, shape, size)
    assert np.array_equal(mask, reference)


def test_ball_of_radius_r_pixels_is_r_over_3_slices_tall_when_z_spacing_is_3x():
    tree = SWCTree.from_arrays([[10, 20, 20]], [-1], radii=6.0)
    mask = rasterize(tree, (21, 41, 41), (990.0, 330.0, 330.0))
    z, y, x = (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    assert (z.min(), z.max()) == (8, 12)  # 6 px * 330 nm = 1980 nm = 2 slices each way
    assert (y.min(), y.max()) == (14, 26)
    assert (x.min(), x.max()) == (14, 26)
    in_um = SWCTree.from_arrays([[9.9, 6.6, 6.6]], [-1], radii=6 * 0.33)
    physical = rasterize(in_um, (21, 41, 41), (990.0, 330.0, 330.0), coords="physical")
    assert np.array_equal(physical, mask)


def test_rasterize_covers_every_node_even_with_zero_radius():
    rng = np.random.default_rng(3)
    tree = random_tree(rng, 60, (16, 48, 48))
    thin = SWCTree(tree.ids, tree.types, tree.xyz, np.zeros(len(tree)), tree.parents)
    for candidate in (tree, thin):
        mask = rasterize(candidate, (16, 48, 48), (3.0, 1.0, 1.0))
        voxel = np.rint(candidate.zyx).astype(int)
        assert mask[tuple(voxel.T)].all()
    # zero-radius edges still leave a connected centre line per tree
    _, n_pieces = ndi.label(rasterize(thin, (16, 48, 48)), structure=np.ones((3, 3, 3)))
    assert n_pieces == 1


def test_radius_floor_crop_origin_and_value_into_an_existing_array():
    tree = branching_tree()
    shape, size = (12, 26, 34), (3.0, 1.0, 1.0)
    thin = SWCTree(tree.ids, tree.types, tree.xyz, np.full(len(tree), 0.2), tree.parents)
    two = SWCTree(tree.ids, tree.types, tree.xyz, np.full(len(tree), 2.0), tree.parents)
    assert np.array_equal(
        rasterize(thin, shape, size, radius_floor=2.0), rasterize(two, shape, size)
    )
    full = rasterize(tree, shape, size)
    crop = rasterize(tree, (6, 10, 14), size, origin_zyx=(3, 8, 15))
    assert np.array_equal(crop, full[3:9, 8:18, 15:29])
    ids = np.full(shape, 7, dtype=np.uint32)
    out = rasterize(tree, shape, size, out=ids, value=42)
    assert out is ids
    assert np.array_equal(ids == 42, full) and np.all(ids[~full] == 7)


# --------------------------------------------------------------------------- traced stacks
@pytest.fixture(params=OP_STACKS)
def op_stack(request, lm_stack, real_data, tmp_path_factory) -> tuple[Path, Path]:
    """The TIFF stack and SWC tracing of DIADEM OP_n where the data is; without it, a synthetic
    stand-in per n (synth_lm seed n, 32 x 128 x 128)."""
    name = request.param
    if lm_stack.real:
        return real_data(f"lm/{name}.tif"), real_data(f"lm/{name}.swc")
    seed = OP_STACKS.index(name)
    urls = write_synthetic("lm", tmp_path_factory.mktemp(name), shape=(32, 128, 128), seed=seed)
    return Path(urls["image"]), Path(urls["swc"])


def op_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float]:
    spacing = json.loads(tif.pages[0].description)["spacing_um_zyx"]
    return tuple(1000.0 * s for s in spacing)


def test_op_masks_are_bright_and_cover_the_swc_nodes(op_stack, lm_stack):
    tif_path, swc_path = op_stack
    with tifffile.TiffFile(tif_path) as tif:
        image = tif.asarray()
        size = op_voxel_size(tif)
    assert image.ndim == 3
    if lm_stack.real:
        assert image.shape[1:] == (512, 512)
    tree = read_swc(swc_path, allow_zero_radius=True)  # OP_2 has r = 0
    mask = rasterize(tree, image.shape, size)
    near = ndi.maximum_filter(mask, size=(3, 9, 9))
    inside_mean = float(image[mask].mean())
    background_mean = float(image[~near].mean())
    assert inside_mean > 10 * background_mean, (inside_mean, background_mean)
    assert inside_mean > 40
    voxel = np.rint(tree.zyx).astype(int)
    in_stack = np.all((voxel >= 0) & (voxel < image.shape), axis=1)
    assert in_stack.mean() > 0.95
    assert mask[tuple(voxel[in_stack].T)].all()
    # the same tree written in micrometres rasterises to the same voxels
    in_um = SWCTree(
        tree.ids,
        tree.types,
        tree.zyx[:, ::-1] * np.asarray(size)[::-1] / 1000,
        tree.radii * size[2] / 1000,
        tree.parents,
    )
    physical = rasterize(in_um, image.shape, size, coords="physical", unit_nm=1000.0)
    assert np.count_nonzero(physical != mask) <= 5e-3 * mask.sum()  # rounding ties only
