"""Stitching blocks: segments that meet across a block face are merged into one object.

Each block was agglomerated on its core plus a halo from its neighbours and kept the labels of
the halo beyond each upper face; across every face those labels are compared with the
neighbour's core labels over the same voxels, and segments that are each other's majority
overlap are merged (union-find), so objects are not cut at block faces.
"""

from __future__ import annotations

import numpy as np

from neuroray.platform.box import Box
from neuroray.platform.volume import open_volume
from neuroray.segmentation.block_output import Markers


def stitch(output: str, blocks: list[Box], blocks_url: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge segments across block faces; returns (block ids, final consecutive ids)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    labelled = open_volume(blocks_url)
    halo_dir = Markers(output).root / "halos"
    pairs = []
    ids: set[int] = set()
    for index, _ in enumerate(blocks):
        with np.load(halo_dir / f"{index}.npz") as halos:
            for axis in range(3):
                if f"{axis}" not in halos:
                    continue
                theirs = halos[f"{axis}"]
                slab = Box.from_list(halos[f"{axis}_box"].tolist())
                ours = labelled.read(slab)
                pairs.append(_majority_pairs(theirs, ours))
            ids.update(halos["ids"].tolist())
    ids.discard(0)
    all_ids = np.asarray(sorted(ids), dtype=np.uint64)
    position = {int(v): i for i, v in enumerate(all_ids)}
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64)
    edges = np.asarray(
        [
            (position[int(a)], position[int(b)])
            for a, b in edges
            if int(a) in position and int(b) in position
        ],
        dtype=np.int64,
    ).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(all_ids),) * 2)
    _, component = connected_components(graph, directed=False)
    return all_ids, (component + 1).astype(np.uint64)


def _majority_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairs (id in a, id in b) that are each other's largest overlap (both non-zero)."""
    both = (a != 0) & (b != 0)
    if not both.any():
        return np.zeros((0, 2), np.uint64)
    pairs, counts = np.unique(np.stack([a[both], b[both]], axis=1), axis=0, return_counts=True)
    best_for_a: dict[int, tuple[int, int]] = {}
    best_for_b: dict[int, tuple[int, int]] = {}
    for (x, y), n in zip(pairs.tolist(), counts.tolist(), strict=True):
        if n > best_for_a.get(x, (0, 0))[0]:
            best_for_a[x] = (n, y)
        if n > best_for_b.get(y, (0, 0))[0]:
            best_for_b[y] = (n, x)
    mutual = [(x, y) for x, (_, y) in best_for_a.items() if best_for_b.get(y, (0, None))[1] == x]
    return np.asarray(mutual, dtype=np.uint64).reshape(-1, 2)
