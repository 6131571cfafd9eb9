"""SWC neuron reconstructions: read, write, validate, resample and rasterise to voxel masks.

An SWC file is a forest of nodes, one per line: ``id type x y z radius parent`` (parent -1 for a
root). :class:`SWCTree` keeps those columns as numpy arrays, with positions in the file's x, y, z
column order (``tree.xyz``) and the project's z, y, x order one property away (``tree.zyx``).

Units are not stored in an SWC file, so every function that turns a tree into voxels or
nanometres says how to read its numbers with two arguments:

``coords="voxel"`` (the default; DIADEM and BigNeuron gold standards, ``../shared/data/lm``)
    x and y are 0-based pixel indices (pixel ``i`` is centred on ``i``), z is the 0-based slice
    index, and the radius is in **x pixels**. A radius of r px is therefore ``r * voxel_size_x``
    nanometres in every direction: on a stack with 330 nm pixels and 1000 nm slices a ball of
    radius 3 px is about 1 slice tall, an ellipsoid in voxel space.
``coords="physical"``
    x, y, z and radius are lengths in units of ``unit_nm`` nanometres (1000 for micrometres, the
    usual SWC unit; 1 for nanometres); voxel ``i`` along an axis is centred on ``i * voxel_size``.

``voxel_size_zyx`` is always in nanometres, z, y, x, as everywhere in neuroray.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components

from neuroray.errors import SWCError

Coords = Literal["voxel", "physical"]
COLUMNS = ("id", "type", "x", "y", "z", "radius", "parent")
#: Standard SWC structure types (the ``type`` column).
SOMA, AXON, BASAL_DENDRITE, APICAL_DENDRITE = 1, 2, 3, 4


@dataclass(frozen=True, eq=False)
class SWCTree:
    """A forest of SWC nodes as parallel numpy arrays (row ``i`` is one node).

    ``parents`` holds parent **ids** as in the file (-1 for roots); :attr:`parent_index` and
    :meth:`edges` give row indices, which is what array code wants.
    """

    ids: np.ndarray  # (N,) int64, unique
    types: np.ndarray  # (N,) int32
    xyz: np.ndarray  # (N, 3) float64, columns x, y, z as in the file
    radii: np.ndarray  # (N,) float64
    parents: np.ndarray  # (N,) int64, parent id or -1

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        n = ids.size
        xyz = np.asarray(self.xyz, dtype=np.float64)
        if xyz.shape != (n, 3):
            raise SWCError(f"SWC positions must have shape ({n}, 3) for {n} ids, got {xyz.shape}")
        fields = {"ids": ids, "xyz": xyz}
        for name, dtype in (("types", np.int32), ("radii", np.float64), ("parents", np.int64)):
            value = np.asarray(getattr(self, name), dtype=dtype)
            if value.ndim == 0:
                value = np.full(n, value, dtype=dtype)
            if value.shape != (n,):
                raise SWCError(f"SWC {name} must have shape ({n},) for {n} ids, got {value.shape}")
            fields[name] = value
        fields["parents"] = np.where(fields["parents"] < 0, -1, fields["parents"])
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_arrays(
        cls,
        zyx: np.ndarray,
        parent_index: np.ndarray,
        radii: float | np.ndarray = 1.0,
        types: int | np.ndarray = AXON,
    ) -> SWCTree:
        """A tree from z, y, x positions and parent **row indices** (-1 for roots); ids are 1..N."""
        zyx = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
        parent_index = np.asarray(parent_index, dtype=np.int64).reshape(-1)
        if parent_index.shape[0] != zyx.shape[0]:
            raise SWCError(
                f"{zyx.shape[0]} positions but {parent_index.shape[0]} parent indices; "
                "give one parent index per node"
            )
        if np.any(parent_index >= zyx.shape[0]):
            raise SWCError(f"parent indices must be < {zyx.shape[0]} (the number of nodes)")
        ids = np.arange(1, zyx.shape[0] + 1, dtype=np.int64)
        parents = np.where(parent_index < 0, -1, parent_index + 1)
        return cls(ids=ids, types=types, xyz=zyx[:, ::-1], radii=radii, parents=parents)

    @classmethod
    def from_edges(
        cls,
        zyx: np.ndarray,
        edges: np.ndarray,
        radii: float | np.ndarray = 1.0,
        types: int | np.ndarray = AXON,
        *,
        break_cycles: bool = False,
    ) -> SWCTree:
        """A forest from an undirected skeleton graph (e.g. kimimaro's vertices and edges).

        Each connected component is rooted at its lowest-index vertex and oriented by breadth-first
        search; rows are reordered so parents come before children. A graph with a cycle raises
        :class:`SWCError` unless ``break_cycles`` keeps a spanning forest (dropping closing edges).
        """
        zyx = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
        n = zyx.shape[0]
        edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
        edges = edges[edges[:, 0] != edges[:, 1]]
        if edges.size and (edges.min() < 0 or edges.max() >= n):
            raise SWCError(f"skeleton edges must index the {n} vertices (0..{n - 1})")
        edges = np.unique(np.sort(edges, axis=1), axis=0)
        graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
        graph = (graph + graph.T).tocsr()
        n_components, component = connected_components(graph, directed=False)
        if len(edges) > n - n_components and not break_cycles:
            raise SWCError(
                f"skeleton graph has {len(edges) - (n - n_components)} edge(s) closing a cycle; "
                "an SWC must be a forest (pass break_cycles=True to keep a spanning forest)"
            )
        order_parts, parent_parts = [], []
        for c in range(n_components):
            root = int(np.flatnonzero(component == c)[0])
            order, predecessors = breadth_first_order(graph, root, directed=False)
            order_parts.append(order)
            parent_parts.append(predecessors[order])
        order = np.concatenate(order_parts)
        parent_vertex = np.concatenate(parent_parts)  # -9999 for roots
        new_index = np.empty(n, dtype=np.int64)
        new_index[order] = np.arange(n)
        parent_index = np.where(parent_vertex < 0, -1, new_index[np.maximum(parent_vertex, 0)])
        radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (n,))[order]
        types = np.broadcast_to(np.asarray(types, dtype=np.int32), (n,))[order]
        return cls.from_arrays(zyx[order], parent_index, radii, types)

    # ----------------------------------------------------------------- structure
    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def zyx(self) -> np.ndarray:
        """Positions in z, y, x order (the project's axis order), shape (N, 3)."""
        return self.xyz[:, ::-1]

    @property
    def parent_index(self) -> np.ndarray:
        """Row index of each node's parent, -1 for roots (and for parents missing from the tree)."""
        n = len(self)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        pos = np.clip(np.searchsorted(sorted_ids, self.parents), 0, n - 1)
        found = (self.parents >= 0) & (sorted_ids[pos] == self.parents)
        return np.where(found, order[pos], -1)

    def edges(self) -> np.ndarray:
        """(E, 2) row indices ``[child, parent]``, one per node that has a parent."""
        parent = self.parent_index
        child = np.flatnonzero(parent >= 0)
        return np.stack([child, parent[child]], axis=1)

    @property
    def roots(self) -> np.ndarray:
        """Row indices of nodes without a parent."""
        return np.flatnonzero(self.parent_index < 0)

    def n_children(self) -> np.ndarray:
        """Number of children of each node (0: tip, >1: branch point)."""
        parent = self.parent_index
        return np.bincount(parent[parent >= 0], minlength=len(self))

    # ----------------------------------------------------------------- units
    def positions_voxel(
        self,
        voxel_size_zyx: Sequence[float] = (1.0, 1.0, 1.0),
        coords: Coords = "voxel",
        unit_nm: float = 1000.0,
    ) -> np.ndarray:
        """(N, 3) z, y, x positions in voxel indices (fractional; voxel i is centred on i)."""
        if coords == "voxel":
            return self.zyx.copy()
        return self.positions_nm(voxel_size_zyx, coords, unit_nm) / _voxel_size(voxel_size_zyx)

    def positions_nm(
        self,
        voxel_size_zyx: Sequence[float] = (1.0, 1.0, 1.0),
        coords: Coords = "voxel",
        unit_nm: float = 1000.0,
    ) -> np.ndarray:
        """(N, 3) z, y, x positions in nanometres (see the module docstring for ``coords``)."""
        _check_coords(coords)
        if coords == "voxel":
            return self.zyx * _voxel_size(voxel_size_zyx)
        return self.zyx * float(unit_nm)

    def radii_nm(
        self,
        voxel_size_zyx: Sequence[float] = (1.0, 1.0, 1.0),
        coords: Coords = "voxel",
        unit_nm: float = 1000.0,
    ) -> np.ndarray:
        """(N,) radii in nanometres: x pixels for ``coords="voxel"``, ``unit_nm`` otherwise."""
        return self.radii * _radius_unit_nm(voxel_size_zyx, coords, unit_nm)


def _voxel_size(voxel_size_zyx: Sequence[float]) -> np.ndarray:
    size = np.asarray(voxel_size_zyx, dtype=np.float64).reshape(-1)
    if size.shape != (3,) or not np.all(size > 0):
        raise SWCError(f"voxel_size_zyx must be three positive numbers (nm), got {voxel_size_zyx}")
    return size


def _check_coords(coords: str) -> None:
    if coords not in ("voxel", "physical"):
        raise SWCError(f"coords must be 'voxel' or 'physical', got {coords!r}")


def _radius_unit_nm(voxel_size_zyx: Sequence[float], coords: Coords, unit_nm: float) -> float:
    _check_coords(coords)
    return float(_voxel_size(voxel_size_zyx)[2]) if coords == "voxel" else float(unit_nm)


# --------------------------------------------------------------------------- validation
def validate(
    tree: SWCTree,
    *,
    source: str = "<SWC tree>",
    line_numbers: Sequence[int] | None = None,
    allow_zero_radius: bool = False,
) -> None:
    """Raise :class:`SWCError` on duplicate ids, dangling parents, cycles or bad radii.

    Messages name ``source`` and, when ``line_numbers`` (one per row) is given, the file line;
    otherwise the row. Zero radii are an error unless ``allow_zero_radius`` (some gold standards,
    e.g. DIADEM OP_2, use 0 for "unknown"; rasterise those with a ``radius_floor``).
    """

    def where(row: int) -> str:
        if line_numbers is not None:
            return f"{source}:{line_numbers[row]}"
        return f"{source}: row {row}"

    n = len(tree)
    if n == 0:
        raise SWCError(
            f"{source}: no nodes; an SWC needs at least one 'id type x y z r parent' line"
        )
    order = np.argsort(tree.ids, kind="stable")
    sorted_ids = tree.ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        first, second = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
        raise SWCError(
            f"{where(second)}: duplicate node id {tree.ids[second]} (first used at "
            f"{where(first)}); give every node a unique id"
        )
    if np.any(tree.ids < 0):
        row = int(np.flatnonzero(tree.ids < 0)[0])
        raise SWCError(f"{where(row)}: node id {tree.ids[row]} is negative; ids must be >= 0")
    bad_xyz = ~np.all(np.isfinite(tree.xyz), axis=1) | ~np.isfinite(tree.radii)
    if bad_xyz.any():
        row = int(np.flatnonzero(bad_xyz)[0])
        raise SWCError(f"{where(row)}: position or radius is not a finite number")
    bad_radius = tree.radii < 0 if allow_zero_radius else tree.radii <= 0
    if bad_radius.any():
        row = int(np.flatnonzero(bad_radius)[0])
        hint = (
            "radii must be >= 0"
            if allow_zero_radius
            else "radii must be > 0 (pass allow_zero_radius=True to accept 0 as 'unknown')"
        )
        raise SWCError(
            f"{where(row)}: node {tree.ids[row]} has radius {tree.radii[row]:g}; {hint}; "
            f"{int(bad_radius.sum())} node(s) affected"
        )
    parent = tree.parent_index
    dangling = (tree.parents >= 0) & (parent < 0)
    if dangling.any():
        row = int(np.flatnonzero(dangling)[0])
        raise SWCError(
            f"{where(row)}: node {tree.ids[row]} names parent {tree.parents[row]}, which is not a "
            "node id in the file; fix the parent or use -1 for a root"
        )
    on_cycle = _nodes_not_reaching_a_root(parent)
    if on_cycle.any():
        row = int(np.flatnonzero(on_cycle)[0])
        seen: list[int] = []
        while row not in seen:  # walk up until the walk repeats: that is the cycle
            seen.append(row)
            row = int(parent[row])
        cycle = seen[seen.index(row) :]
        cycle_rows = sorted(cycle)[:6]
        listed = ", ".join(f"id {tree.ids[r]} ({where(r)})" for r in cycle_rows)
        raise SWCError(
            f"{where(cycle_rows[0])}: parent links form a cycle through {len(cycle)} node(s): "
            f"{listed}; an SWC must be a tree, break the cycle with a -1 parent"
        )


def _nodes_not_reaching_a_root(parent: np.ndarray) -> np.ndarray:
    """True for nodes whose chain of parents never ends (on or above a cycle); pointer jumping."""
    ancestor = parent.copy()
    for _ in range(max(1, int(np.ceil(np.log2(max(len(parent), 2)))) + 1)):
        valid = ancestor >= 0
        ancestor[valid] = ancestor[ancestor[valid]]
        if not (ancestor >= 0).any():
            break
    return ancestor >= 0


# --------------------------------------------------------------------------- file I/O
def read_swc(path: str | os.PathLike[str], *, allow_zero_radius: bool = False) -> SWCTree:
    """Read and validate an SWC file; any problem raises :class:`SWCError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise SWCError(f"SWC file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as err:
        raise SWCError(f"SWC file {str(path)!r} cannot be read as text: {err}") from None
    rows: list[list[float]] = []
    line_numbers: list[int] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != len(COLUMNS):
            raise SWCError(
                f"{path}:{number}: expected {len(COLUMNS)} columns ({' '.join(COLUMNS)}), "
                f"found {len(fields)}: {raw.strip()!r}"
            )
        values = []
        for name, field in zip(COLUMNS, fields, strict=True):
            try:
                value = float(field)
            except ValueError:
                raise SWCError(
                    f"{path}:{number}: column {name!r} is not a number: {field!r}"
                ) from None
            if name in ("id", "type", "parent") and not float(value).is_integer():
                raise SWCError(f"{path}:{number}: column {name!r} must be an integer: {field!r}")
            values.append(value)
        rows.append(values)
        line_numbers.append(number)
    table = np.asarray(rows, dtype=np.float64).reshape(-1, len(COLUMNS))
    tree = SWCTree(
        ids=table[:, 0].astype(np.int64),
        types=table[:, 1].astype(np.int32),
        xyz=table[:, 2:5],
        radii=table[:, 5],
        parents=table[:, 6].astype(np.int64),
    )
    validate(tree, source=str(path), line_numbers=line_numbers, allow_zero_radius=allow_zero_radius)
    return tree


def write_swc(tree: SWCTree, path: str | os.PathLike[str], *, comment: str | None = None) -> None:
    """Write ``tree`` atomically (a temporary file renamed over ``path``): complete or absent.

    Floats are written with Python's shortest round-trip repr, so reading back is exact.
    """
    path = Path(path)
    lines = ["# written by neuroray"]
    if comment:
        lines += [f"# {part}" for part in comment.splitlines()]
    lines.append("# " + " ".join(COLUMNS))
    for i in range(len(tree)):
        x, y, z = (repr(float(v)) for v in tree.xyz[i])
        lines.append(
            f"{tree.ids[i]} {tree.types[i]} {x} {y} {z} {float(tree.radii[i])!r} {tree.parents[i]}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- resampling
def resample(
    tree: SWCTree, step: float, *, spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0)
) -> SWCTree:
    """Evenly spaced nodes along every unbranched path, keeping roots, branch points and tips.

    Each path between two such critical nodes is replaced by nodes equally spaced along its arc
    length, at most ``step`` apart (positions and radii interpolated linearly); a path shorter than
    ``step`` keeps only its ends. Lengths are measured on coordinates multiplied by
    ``spacing_xyz`` (e.g. ``(0.33, 0.33, 1.0)`` to step in micrometres on a DIADEM tree stored in
    pixels and slices). Ids become 1..N with parents before children; the branching topology is
    unchanged.
    """
    if not step > 0:
        raise SWCError(f"resample step must be > 0, got {step}")
    validate(tree, allow_zero_radius=True)
    scale = np.asarray(spacing_xyz, dtype=np.float64).reshape(3)
    parent = tree.parent_index
    critical = (parent < 0) | (tree.n_children() != 1)
    new_xyz: list[np.ndarray] = [tree.xyz[critical]]
    new_radii: list[np.ndarray] = [tree.radii[critical]]
    new_types: list[np.ndarray] = [tree.types[critical]]
    new_of_critical = np.full(len(tree), -1, dtype=np.int64)
    new_of_critical[critical] = np.arange(int(critical.sum()))
    new_parent: list[np.ndarray] = [np.full(int(critical.sum()), -1, dtype=np.int64)]
    n_new = int(critical.sum())
    for end in np.flatnonzero(critical & (parent >= 0)):
        path = [int(end), int(parent[end])]
        while not critical[path[-1]]:
            path.append(int(parent[path[-1]]))
        path.reverse()  # upper critical node ... end
        points = tree.xyz[path]
        arc = np.concatenate(
            [[0.0], np.cumsum(np.linalg.norm(np.diff(points * scale, axis=0), axis=1))]
        )
        n_segments = max(1, int(np.ceil(arc[-1] / step - 1e-9)))
        inner = arc[-1] * np.arange(1, n_segments) / n_segments
        xyz = np.stack([np.interp(inner, arc, points[:, k]) for k in range(3)], axis=1)
        radii = np.interp(inner, arc, tree.radii[path])
        chain = np.arange(n_new, n_new + inner.size)
        parents_of_chain = np.concatenate([[new_of_critical[path[0]]], chain])[:-1]
        new_xyz.append(xyz)
        new_radii.append(radii)
        new_types.append(np.full(inner.size, tree.types[end], dtype=np.int32))
        new_parent.append(parents_of_chain.astype(np.int64))
        new_parent[0][new_of_critical[end]] = chain[-1] if inner.size else new_of_critical[path[0]]
        n_new += inner.size
    xyz = np.concatenate(new_xyz)
    parent_index = np.concatenate(new_parent)
    order = _parents_first_order(parent_index)
    remap = np.empty_like(order)
    remap[order] = np.arange(order.size)
    parent_index = np.where(parent_index[order] < 0, -1, remap[np.maximum(parent_index[order], 0)])
    return SWCTree.from_arrays(
        xyz[order][:, ::-1],
        parent_index,
        np.concatenate(new_radii)[order],
        np.concatenate(new_types)[order],
    )


def _parents_first_order(parent_index: np.ndarray) -> np.ndarray:
    """A row order in which every parent precedes its children (depth-first from each root)."""
    n = parent_index.size
    children: list[list[int]] = [[] for _ in range(n)]
    for child, par in enumerate(parent_index.tolist()):
        if par >= 0:
            children[par].append(child)
    order: list[int] = []
    for root in np.flatnonzero(parent_index < 0).tolist():
        stack = [root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(children[node]))
    return np.asarray(order, dtype=np.int64)


# --------------------------------------------------------------------------- rasterisation
def rasterize(
    tree: SWCTree,
    shape_zyx: Sequence[int],
    voxel_size_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    coords: Coords = "voxel",
    unit_nm: float = 1000.0,
    radius_floor: float = 0.0,
    origin_zyx: Sequence[float] = (0.0, 0.0, 0.0),
    out: np.ndarray | None = None,
    value: Any = True,
) -> np.ndarray:
    """Voxel mask of a tree: a ball at every node and a cone (linearly varying radius) per edge.

    Distances are measured in nanometres, so anisotropic voxels are honoured: with
    ``coords="voxel"`` a radius of r x-pixels spans ``r * vx / vz`` slices in z. Radii below
    ``radius_floor`` (same unit as the radii) are raised to it. Independently of radius, the voxel
    nearest to every node and to every point of each edge's centre line is set, so zero-radius or
    sub-voxel branches stay connected and every node inside the volume is covered.

    ``origin_zyx`` is the voxel index (in the tree's voxel frame) of the output's first voxel, for
    rasterising a crop. With ``out`` (any dtype, shape ``shape_zyx``) the voxels are set to
    ``value`` in place (e.g. an instance id) and ``out`` is returned; otherwise a new bool mask.
    Work is vectorised per edge over the edge's bounding box only.
    """
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3 or min(shape) < 0:
        raise SWCError(f"shape_zyx must be three non-negative integers, got {shape_zyx}")
    if out is None:
        out = np.zeros(shape, dtype=bool)
    elif out.shape != shape:
        raise SWCError(f"out has shape {out.shape} but shape_zyx is {shape}")
    if len(tree) == 0 or min(shape) == 0:
        return out
    size = _voxel_size(voxel_size_zyx)
    pos = tree.positions_voxel(size, coords, unit_nm) - np.asarray(origin_zyx, dtype=np.float64)
    radii_nm = np.maximum(tree.radii, radius_floor) * _radius_unit_nm(size, coords, unit_nm)
    edges = tree.edges()
    roots = tree.roots
    a = np.concatenate([edges[:, 0], roots])
    b = np.concatenate([edges[:, 1], roots])
    upper = np.asarray(shape)
    extent = radii_nm[:, None] / size  # per-node radius in voxels along z, y, x
    lo_all = np.floor(np.minimum(pos[a] - extent[a], pos[b] - extent[b])).astype(np.int64)
    hi_all = np.ceil(np.maximum(pos[a] + extent[a], pos[b] + extent[b])).astype(np.int64) + 1
    lo_all = np.clip(lo_all, 0, upper)
    hi_all = np.clip(hi_all, 0, upper)
    keep = np.all(hi_all > lo_all, axis=1) & (np.maximum(radii_nm[a], radii_nm[b]) > 0)
    for i in np.flatnonzero(keep):
        lo, hi = lo_all[i], hi_all[i]
        start = pos[a[i]] * size
        delta = pos[b[i]] * size - start
        gz = (np.arange(lo[0], hi[0]) * size[0] - start[0])[:, None, None]
        gy = (np.arange(lo[1], hi[1]) * size[1] - start[1])[None, :, None]
        gx = (np.arange(lo[2], hi[2]) * size[2] - start[2])[None, None, :]
        length2 = float(delta @ delta)
        if length2 > 0:
            t = np.clip((gz * delta[0] + gy * delta[1] + gx * delta[2]) / length2, 0.0, 1.0)
        else:
            t = np.zeros((1, 1, 1))
        radius = radii_nm[a[i]] + t * (radii_nm[b[i]] - radii_nm[a[i]])
        dist2 = (gz - t * delta[0]) ** 2 + (gy - t * delta[1]) ** 2 + (gx - t * delta[2]) ** 2
        inside = dist2 <= radius * radius
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][inside] = value
    _draw_centre_lines(out, pos[a], pos[b], value)
    return out


def _draw_centre_lines(out: np.ndarray, start: np.ndarray, end: np.ndarray, value: Any) -> None:
    """Set the nearest voxel of points every <= 0.5 voxel along each segment (all at once)."""
    n_steps = np.ceil(2 * np.abs(end - start).max(axis=1)).astype(np.int64) + 1
    segment = np.repeat(np.arange(len(start)), n_steps)
    first = np.repeat(np.cumsum(n_steps) - n_steps, n_steps)
    t = (np.arange(segment.size) - first) / np.maximum(n_steps[segment] - 1, 1)
    points = start[segment] + t[:, None] * (end[segment] - start[segment])
    voxel = np.rint(points).astype(np.int64)
    inside = np.all((voxel >= 0) & (voxel < np.asarray(out.shape)), axis=1)
    voxel = voxel[inside]
    out[voxel[:, 0], voxel[:, 1], voxel[:, 2]] = value
