"""Chunk servers: Ray actors that keep decoded chunks of a layer in memory and serve crops.

Reading each training crop straight from a precomputed or zarr layer costs 15–80× more than
slicing RAM (RAY_NOTES.md), so a :class:`ServerPool` splits the chunk grid into balanced,
spatially contiguous shards and gives each to a :class:`ChunkServer` actor with an LRU of
decoded chunks. Crops are routed to the owner of the chunk under the crop's centre and served
in batches (one actor call per 8–32 crops: a one-crop call costs as much as reading storage).

**Crops that cross shards.** A server reads a neighbouring shard's chunk from storage itself,
into a smaller "borrowed" LRU, rather than asking its owner. Asking costs an actor call (≈1 ms)
plus a copy through the object store, queues behind the owner's own batches, and two servers
waiting on each other could deadlock; a chunk decode is 1–3 ms and runs in parallel. Routing by
centre keeps borrowed chunks to the crop's rim, so caches hardly duplicate.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from neuroray.errors import VolumeError
from neuroray.platform.box import Box, chunk_grid, chunks_touching
from neuroray.platform.volume import Volume, open_volume

log = logging.getLogger(__name__)

_RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError)


# ---------------------------------------------------------------------- shard planning
def plan_shards(bounds: Box, chunk_shape: Sequence[int], num_shards: int) -> list[list[Box]]:
    """Split the chunk grid into ``num_shards`` contiguous slabs of (almost) equal chunk counts.

    Chunks are ordered along the longest axis of the grid first, so each shard is a slab and
    most crops fall inside one shard.
    """
    chunks = list(chunk_grid(bounds, chunk_shape))
    if num_shards < 1:
        raise ValueError("num_shards must be at least 1")
    num_shards = min(num_shards, len(chunks))
    grid = [
        -(-(b - a) // c) for a, b, c in zip(bounds.start, bounds.stop, chunk_shape, strict=True)
    ]
    axes = sorted(range(3), key=lambda a: -grid[a])
    chunks.sort(key=lambda box: tuple(box.start[a] for a in axes))
    edges = np.linspace(0, len(chunks), num_shards + 1).round().astype(int)
    return [chunks[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


# ---------------------------------------------------------------------- an LRU of decoded chunks
class ChunkCache:
    """Least-recently-used decoded chunks under a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self.bytes = 0
        self._items: OrderedDict[Any, np.ndarray] = OrderedDict()

    def get(self, key: Any) -> np.ndarray | None:
        array = self._items.get(key)
        if array is not None:
            self._items.move_to_end(key)
        return array

    def put(self, key: Any, array: np.ndarray) -> None:
        if array.nbytes > self.budget_bytes:
            return  # larger than the whole budget: serve it without caching
        if key in self._items:
            self.bytes -= self._items.pop(key).nbytes
        self._items[key] = array
        self.bytes += array.nbytes
        while self.bytes > self.budget_bytes:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._items)


# ---------------------------------------------------------------------- the actor
class ChunkServer:
    """Serves crops of one or more aligned layers (e.g. ``image`` and ``labels``) for one shard."""

    BORROWED_SHARE = 0.25  # of the budget, for chunks of other shards at crop rims

    def __init__(
        self,
        layers: dict[str, str],
        shard: list[list[int]],
        cache_bytes: int,
        preload: bool = False,
    ) -> None:
        self.volumes: dict[str, Volume] = {name: open_volume(url) for name, url in layers.items()}
        reference = next(iter(self.volumes.values()))
        for name, volume in self.volumes.items():
            if volume.shape != reference.shape:
                raise VolumeError(
                    f"layer {name!r} ({volume.url}) has shape {volume.shape}, but "
                    f"{reference.url} has {reference.shape}: layers served together must align"
                )
        self.bounds = reference.bounds
        self.chunk_shape = reference.chunk_shape
        self.owned = {Box.from_list(b).start for b in shard}
        borrowed = int(cache_bytes * self.BORROWED_SHARE)
        self.own_cache = ChunkCache(cache_bytes - borrowed)
        self.borrowed_cache = ChunkCache(borrowed)
        self.counters = {"crops": 0, "calls": 0, "hits": 0, "reads": 0, "borrowed_reads": 0}
        if preload:
            for box in (Box.from_list(b) for b in shard):
                for name in self.volumes:
                    self._chunk(name, box)

    def _chunk(self, name: str, box: Box) -> np.ndarray:
        owned = box.start in self.owned
        cache = self.own_cache if owned else self.borrowed_cache
        key = (name, box.start)
        array = cache.get(key)
        if array is not None:
            self.counters["hits"] += 1
            return array
        array = self.volumes[name].read(box)
        self.counters["reads" if owned else "borrowed_reads"] += 1
        cache.put(key, array)
        return array

    def get_crops(self, boxes: list[list[int]]) -> dict[str, np.ndarray]:
        """Crops stacked per layer: ``{name: [B, (C,) z, y, x]}``; boxes as [z0,y0,x0,z1,y1,x1]."""
        crops = np.asarray(boxes, dtype=np.int64).reshape(-1, 6)
        shape = crops[0, 3:] - crops[0, :3]
        if (crops[:, 3:] - crops[:, :3] != shape).any():
            raise VolumeError("all crops of one request must have the same shape")
        if (crops[:, :3] < 0).any() or (crops[:, 3:] > np.asarray(self.bounds.stop)).any():
            raise VolumeError(
                f"crops {crops.tolist()} reach outside the layer bounds {self.bounds}"
            )
        pieces = [self._pieces(crop) for crop in crops]
        out: dict[str, np.ndarray] = {}
        for name, volume in self.volumes.items():
            channels = () if volume.num_channels == 1 else (volume.num_channels,)
            batch = np.empty((len(crops), *channels, *shape.tolist()), dtype=volume.dtype)
            for i, crop_pieces in enumerate(pieces):
                target = batch[i]
                for chunk_box, dst, src in crop_pieces:
                    target[(Ellipsis, *dst)] = self._chunk(name, chunk_box)[(Ellipsis, *src)]
            out[name] = batch
        self.counters["crops"] += len(crops)
        self.counters["calls"] += 1
        return out

    def _pieces(self, crop: np.ndarray) -> list[tuple[Box, tuple[slice, ...], tuple[slice, ...]]]:
        """For each chunk under ``crop``: the chunk box, slices into the crop, slices into the chunk.

        Plain integer arithmetic: this runs for every chunk of every crop.
        """
        per_axis = []
        for axis in range(3):
            lo, hi, c, end = (
                crop[axis],
                crop[axis + 3],
                self.chunk_shape[axis],
                self.bounds.stop[axis],
            )
            spans = []
            for a in range(int(lo // c * c), int(hi), c):
                b = min(a + c, end)
                s, e = max(a, lo), min(b, hi)
                spans.append((a, b, slice(int(s - lo), int(e - lo)), slice(int(s - a), int(e - a))))
            per_axis.append(spans)
        return [
            (Box((z[0], y[0], x[0]), (z[1], y[1], x[1])), (z[2], y[2], x[2]), (z[3], y[3], x[3]))
            for z in per_axis[0]
            for y in per_axis[1]
            for x in per_axis[2]
        ]

    def stats(self) -> dict[str, Any]:
        import resource

        return {
            **self.counters,
            "pid": os.getpid(),
            "owned_chunks": len(self.owned),
            "cached_bytes": self.own_cache.bytes + self.borrowed_cache.bytes,
            "budget_bytes": self.own_cache.budget_bytes + self.borrowed_cache.budget_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_bytes": _rss_bytes(),
        }

    def ping(self) -> int:
        return os.getpid()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------- the pool (client side)
@dataclass
class PoolStats:
    retries: int = 0
    batches: int = 0
    crops: int = 0
    per_server: list[dict[str, Any]] = field(default_factory=list)


class ServerPool:
    """N chunk servers over aligned layers, with routing, bounded in-flight requests and retries.

    The pool object is a light client (actor handles + the shard plan): it pickles, so Ray Train
    workers receive it in their config and pull crops themselves.
    """

    def __init__(
        self,
        layers: dict[str, str],
        *,
        num_servers: int = 2,
        cache_mb: float = 256,
        preload: bool = False,
        num_cpus: float = 0,
        resources: dict[str, float] | None = None,
        max_restarts: int = 5,
        max_retries: int = 5,
        name: str | None = None,
    ) -> None:
        if not layers:
            raise VolumeError("a ServerPool needs at least one layer")
        self.layers = dict(layers)
        reference = open_volume(next(iter(layers.values())))
        self.bounds = reference.bounds
        self.chunk_shape = reference.chunk_shape
        self.voxel_size = reference.voxel_size
        self.shards = plan_shards(self.bounds, self.chunk_shape, num_servers)
        self._owner = {box.start: i for i, shard in enumerate(self.shards) for box in shard}
        self.max_retries = max_retries
        self.stats_ = PoolStats()
        actor_options = dict(
            num_cpus=num_cpus,
            resources=resources or {},
            max_restarts=max_restarts,
            max_task_retries=0,  # retried here, so a consumer sees each failure once at most
            max_concurrency=1,
        )
        actor_class = ray.remote(ChunkServer)
        self.servers = []
        for i, shard in enumerate(self.shards):
            options = {} if name is None else {"name": f"neuroray-chunks-{name}-{i}"}
            self.servers.append(
                actor_class.options(**actor_options, **options).remote(
                    self.layers,
                    [b.to_list() for b in shard],
                    int(cache_mb * 2**20),
                    preload,
                )
            )
        ray.get([s.ping.remote() for s in self.servers])

    # -------------------------------------------------------------- routing
    def owner_of(self, crop: Box) -> int:
        centre = [
            min((a + b) // 2, hi - 1)
            for a, b, hi in zip(crop.start, crop.stop, self.bounds.stop, strict=True)
        ]
        chunk = next(
            chunks_touching(Box.from_shape((1, 1, 1), centre), self.chunk_shape, self.bounds)
        )
        return self._owner[chunk.start]

    def _submit(self, server: int, crops: Sequence[Box]) -> ray.ObjectRef:
        return self.servers[server].get_crops.remote([c.to_list() for c in crops])

    def _fetch(
        self, server: int, crops: Sequence[Box], ref: ray.ObjectRef
    ) -> dict[str, np.ndarray]:
        """Wait for one batch, resubmitting it while its server restarts."""
        for attempt in range(self.max_retries + 1):
            try:
                return ray.get(ref)
            except _RETRYABLE as err:
                if attempt == self.max_retries:
                    raise VolumeError(
                        f"chunk server {server} failed {attempt + 1} times serving {len(crops)} "
                        f"crops: {err}"
                    ) from err
                self.stats_.retries += 1
                log.warning(
                    "chunk server %d died (%s); retrying its batch", server, type(err).__name__
                )
                time.sleep(min(0.2 * 2**attempt, 2.0))
                ref = self._submit(server, crops)
        raise AssertionError("unreachable")

    def get_crops(self, crops: Sequence[Box]) -> dict[str, np.ndarray]:
        """Crops in request order, stacked per layer (``{name: [B, ...]}``)."""
        return next(self.stream([list(crops)], max_in_flight=1))

    def stream(
        self, batches: Iterable[Sequence[Box]], max_in_flight: int = 4
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield each batch of crops in order, keeping at most ``max_in_flight`` batches pending.

        A batch is split by owner server, so one call per server per batch; at most
        ``max_in_flight`` batches are outstanding (backpressure on the object store).
        """
        pending: list[tuple[list[Box], list[tuple[int, list[int], ray.ObjectRef]]]] = []
        source = iter(batches)
        exhausted = False
        while True:
            while not exhausted and len(pending) < max_in_flight:
                try:
                    crops = list(next(source))
                except StopIteration:
                    exhausted = True
                    break
                by_server: dict[int, list[int]] = {}
                for index, crop in enumerate(crops):
                    by_server.setdefault(self.owner_of(crop), []).append(index)
                parts = [
                    (server, idx, self._submit(server, [crops[i] for i in idx]))
                    for server, idx in by_server.items()
                ]
                pending.append((crops, parts))
            if not pending:
                return
            crops, parts = pending.pop(0)
            yield self._assemble(crops, parts)

    def _assemble(
        self, crops: list[Box], parts: list[tuple[int, list[int], ray.ObjectRef]]
    ) -> dict[str, np.ndarray]:
        if len(parts) == 1:
            server, _, ref = parts[0]
            result = self._fetch(server, crops, ref)
        else:
            result = {}
            for server, idx, ref in parts:
                part = self._fetch(server, [crops[i] for i in idx], ref)
                for name, array in part.items():
                    if name not in result:
                        result[name] = np.empty((len(crops), *array.shape[1:]), array.dtype)
                    result[name][idx] = array
        self.stats_.batches += 1
        self.stats_.crops += len(crops)
        return result

    # -------------------------------------------------------------- management
    def server_stats(self) -> list[dict[str, Any]]:
        return ray.get([s.stats.remote() for s in self.servers])

    def shutdown(self) -> None:
        for server in self.servers:
            ray.kill(server, no_restart=True)
        self.servers = []

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.stats_ = PoolStats()
