"""Chunk servers: Ray actors that own shards of a layer's chunk grid and serve decoded chunks.

Reading each training crop straight from a precomputed or zarr layer costs 15–80× more than
slicing RAM (RAY_NOTES.md), so a :class:`ServerPool` splits the chunk grid into balanced,
spatially contiguous shards and gives each to a :class:`ChunkServer` actor that decodes its
chunks once and keeps them in an LRU under a byte budget.

**Two ways to serve a crop** (``ServerPool(mode=...)``):

- ``"chunks"`` (default): servers keep decoded chunks in Ray's shared-memory object store and
  answer *which objects hold the chunks* a batch needs; the consumer maps them zero-copy (they
  cross the network once when it runs on another node, then stay in its local store and its own
  small LRU) and assembles crops itself. Measured here, shipping assembled crops back through
  the object store costs ~0.6 ms per 32×160×160 crop, 3× the assembly itself; mapping chunks
  costs nothing per crop.
- ``"crops"``: the owner server assembles each crop and ships it (useful when consumers are far
  away and crops are much smaller than the chunks they touch).

**Crops that cross shards.** In ``"chunks"`` mode each chunk is always asked of its owner (one
call per server per batch, all in flight at once), so shards never duplicate decoded chunks.
In ``"crops"`` mode a crop goes to the owner of the chunk under its centre, which reads the
rim chunks of other shards from storage itself into a small "borrowed" LRU rather than calling
their owners: a call costs ≈1 ms plus a copy and queues behind the owner's own batches, and two
servers waiting on each other could deadlock, while a decode is 1–3 ms and runs in parallel.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    ObjectLostError,
    OwnerDiedError,
    RayActorError,
)

from neuroray.errors import VolumeError
from neuroray.platform.box import Box, chunk_grid, chunks_touching
from neuroray.platform.volume import Volume, open_volume

log = logging.getLogger(__name__)

_RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError, ObjectLostError, OwnerDiedError)
ServeMode = Literal["chunks", "crops"]


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


# ---------------------------------------------------------------------- LRU under a byte budget
class ChunkCache:
    """Least-recently-used values (decoded chunks, or object refs to them) under a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self.bytes = 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def get(self, key: Any) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Any, value: Any, nbytes: int | None = None) -> None:
        nbytes = int(value.nbytes if nbytes is None else nbytes)
        if nbytes > self.budget_bytes:
            return  # larger than the whole budget: serve it without caching
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.budget_bytes:
            _, (_, evicted) = self._items.popitem(last=False)
            self.bytes -= evicted

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


# ---------------------------------------------------------------------- crop assembly
Piece = tuple[tuple[int, int, int], tuple[slice, ...], tuple[slice, ...]]


def crop_pieces(crop: Sequence[int], chunk_shape: Sequence[int], bounds: Box) -> list[Piece]:
    """For each chunk under a crop [z0,y0,x0,z1,y1,x1]: its start, slices into the crop, slices
    into the chunk. Plain integer arithmetic: this runs for every chunk of every crop."""
    per_axis = []
    for axis in range(3):
        lo, hi, c, end = crop[axis], crop[axis + 3], chunk_shape[axis], bounds.stop[axis]
        spans = []
        for a in range(int(lo // c * c), int(hi), c):
            b = min(a + c, end)
            s, e = max(a, lo), min(b, hi)
            spans.append((a, slice(int(s - lo), int(e - lo)), slice(int(s - a), int(e - a))))
        per_axis.append(spans)
    return [
        ((z[0], y[0], x[0]), (z[1], y[1], x[1]), (z[2], y[2], x[2]))
        for z in per_axis[0]
        for y in per_axis[1]
        for x in per_axis[2]
    ]


def check_crops(boxes: Sequence[Sequence[int]], bounds: Box) -> np.ndarray:
    crops = np.asarray(boxes, dtype=np.int64).reshape(-1, 6)
    shape = crops[0, 3:] - crops[0, :3]
    if (crops[:, 3:] - crops[:, :3] != shape).any():
        raise VolumeError("all crops of one request must have the same shape")
    if (crops[:, :3] < 0).any() or (crops[:, 3:] > np.asarray(bounds.stop)).any():
        raise VolumeError(f"crops {crops.tolist()} reach outside the layer bounds {bounds}")
    return crops


def assemble(
    crops: np.ndarray,
    layers: dict[str, tuple[np.dtype, int]],
    chunk_shape: Sequence[int],
    bounds: Box,
    chunk: Callable[[str, tuple[int, int, int]], np.ndarray],
) -> dict[str, np.ndarray]:
    """Stack crops per layer from decoded chunks: ``{name: [B, (C,) z, y, x]}``."""
    shape = (crops[0, 3:] - crops[0, :3]).tolist()
    pieces = [crop_pieces(c, chunk_shape, bounds) for c in crops]
    out = {}
    for name, (dtype, channels) in layers.items():
        batch = np.empty((len(crops), *((channels,) if channels > 1 else ()), *shape), dtype)
        for target, crop_pieces_ in zip(batch, pieces, strict=True):
            for start, dst, src in crop_pieces_:
                target[(Ellipsis, *dst)] = chunk(name, start)[(Ellipsis, *src)]
        out[name] = batch
    return out


# ---------------------------------------------------------------------- the actor
class ChunkServer:
    """Owns one shard of aligned layers (e.g. ``image`` and ``labels``): decodes, caches, serves."""

    BORROWED_SHARE = 0.25  # of the budget, for rim chunks of other shards ("crops" mode)

    def __init__(
        self,
        layers: dict[str, str],
        shard: list[list[int]],
        cache_bytes: int,
        preload: bool = False,
        block_shape: Sequence[int] | None = None,
        mode: ServeMode = "chunks",
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
        self.chunk_shape = tuple(block_shape or reference.chunk_shape)
        self.owned = {Box.from_list(b).start for b in shard}
        borrowed = int(cache_bytes * self.BORROWED_SHARE)
        self.own_cache = ChunkCache(cache_bytes - borrowed)
        self.borrowed_cache = ChunkCache(borrowed)
        self.shared_cache = ChunkCache(cache_bytes)  # object refs of chunks in the object store
        self.counters = {"crops": 0, "calls": 0, "hits": 0, "reads": 0, "borrowed_reads": 0}
        self.peak_private_bytes = 0
        if preload:
            load = self._shared if mode == "chunks" else self._chunk
            for box in (Box.from_list(b) for b in shard):
                for name in self.volumes:
                    load(name, box.start)

    def _box(self, start: tuple[int, int, int]) -> Box:
        return Box.from_shape(self.chunk_shape, start).intersect(self.bounds)

    def _read(self, name: str, start: tuple[int, int, int]) -> np.ndarray:
        self.counters["reads" if start in self.owned else "borrowed_reads"] += 1
        return self.volumes[name].read(self._box(start))

    def _chunk(self, name: str, start: tuple[int, int, int]) -> np.ndarray:
        """A decoded chunk from this process's heap ("crops" mode)."""
        cache = self.own_cache if start in self.owned else self.borrowed_cache
        key = (name, start)
        array = cache.get(key)
        if array is not None:
            self.counters["hits"] += 1
            return array
        array = self._read(name, start)
        cache.put(key, array)
        return array

    def _shared(self, name: str, start: tuple[int, int, int]) -> ray.ObjectRef:
        """A decoded chunk placed in the object store once ("chunks" mode)."""
        key = (name, start)
        ref = self.shared_cache.get(key)
        if ref is not None:
            self.counters["hits"] += 1
            return ref
        array = self._read(name, start)
        ref = ray.put(array)
        self.shared_cache.put(key, ref, array.nbytes)
        return ref

    def chunk_refs(self, starts: list[list[int]]) -> dict[str, list[ray.ObjectRef]]:
        """Object refs of the chunks starting at ``starts`` (z, y, x), per layer."""
        keys = [tuple(int(v) for v in s) for s in starts]
        unknown = [k for k in keys if self._box(k).empty or k not in self.owned]
        if unknown:
            raise VolumeError(f"chunks {unknown[:4]} are not in this server's shard")
        out = {name: [self._shared(name, k) for k in keys] for name in self.volumes}
        self.counters["calls"] += 1
        self._sample_memory()
        return out

    def get_crops(self, boxes: list[list[int]]) -> dict[str, np.ndarray]:
        """Crops assembled here, stacked per layer: ``{name: [B, (C,) z, y, x]}``."""
        crops = check_crops(boxes, self.bounds)
        layers = {n: (v.dtype, v.num_channels) for n, v in self.volumes.items()}
        out = assemble(crops, layers, self.chunk_shape, self.bounds, self._chunk)
        self.counters["crops"] += len(crops)
        self.counters["calls"] += 1
        self._sample_memory()
        return out

    def _sample_memory(self) -> None:
        if self.counters["calls"] % 16 == 1:
            self.peak_private_bytes = max(self.peak_private_bytes, _private_bytes())

    def stats(self) -> dict[str, Any]:
        self.peak_private_bytes = max(self.peak_private_bytes, _private_bytes())
        return {
            **self.counters,
            "pid": os.getpid(),
            "owned_chunks": len(self.owned),
            "heap_cached_bytes": self.own_cache.bytes + self.borrowed_cache.bytes,
            "shared_cached_bytes": self.shared_cache.bytes,
            "budget_bytes": self.shared_cache.budget_bytes,
            "private_bytes": _private_bytes(),
            "peak_private_bytes": self.peak_private_bytes,
        }

    def ping(self) -> int:
        return os.getpid()


def _private_bytes() -> int:
    """Memory this process alone holds (USS): excludes the shared object store it maps."""
    import psutil

    return int(psutil.Process().memory_full_info().uss)


# ---------------------------------------------------------------------- serving blocks
SERVING_TARGET = (64, 256, 256)


def serving_blocks(
    chunk_shape: Sequence[int],
    volume_shape: Sequence[int],
    block_shape: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """The unit servers decode, cache and hand out: whole storage chunks, grouped.

    Storage chunks are sized for I/O (often 64³); a 32×160×160 crop touches ~20 of them, and
    assembling a crop from many small pieces costs more than the copy itself. By default
    servers group chunks into blocks of about 64×256×256 voxels (never beyond the volume), so a
    crop touches a few blocks. An explicit ``block_shape`` must be a multiple of the chunks.
    """
    if block_shape is not None:
        if any(b % c for b, c in zip(block_shape, chunk_shape, strict=True)):
            raise VolumeError(
                f"block_shape {tuple(block_shape)} must be a multiple of the layer's chunks {tuple(chunk_shape)}"
            )
        return tuple(int(b) for b in block_shape)  # type: ignore[return-value]
    out = []
    for c, n, target in zip(chunk_shape, volume_shape, SERVING_TARGET, strict=True):
        factor = max(1, target // c)
        out.append(min(c * factor, -(-n // c) * c))
    return tuple(out)  # type: ignore[return-value]


# ---------------------------------------------------------------------- the pool (client side)
@dataclass
class PoolStats:
    retries: int = 0
    batches: int = 0
    crops: int = 0
    per_server: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Pending:
    crops: np.ndarray
    calls: list[tuple[int, Any, ray.ObjectRef]]  # (server, request payload, reply)


class ServerPool:
    """N chunk servers over aligned layers, with routing, bounded in-flight requests and retries.

    The pool object is a light client (actor handles + the shard plan): it pickles, so Ray Train
    workers receive it in their config and pull crops themselves. ``client_cache_mb`` bounds
    the blocks a consumer keeps mapped between batches; ``block_shape`` sets the serving unit
    (see :func:`serving_blocks`; ``pool.chunk_shape`` is that unit).
    """

    def __init__(
        self,
        layers: dict[str, str],
        *,
        num_servers: int = 2,
        cache_mb: float = 256,
        preload: bool = False,
        mode: ServeMode = "chunks",
        block_shape: Sequence[int] | None = None,
        client_cache_mb: float = 128,
        num_cpus: float = 0,
        resources: dict[str, float] | None = None,
        max_restarts: int = 5,
        max_retries: int = 5,
        name: str | None = None,
    ) -> None:
        if not layers:
            raise VolumeError("a ServerPool needs at least one layer")
        if mode not in ("chunks", "crops"):
            raise VolumeError(f"mode must be 'chunks' or 'crops', not {mode!r}")
        self.layers = dict(layers)
        volumes = {n: open_volume(u) for n, u in layers.items()}
        reference = next(iter(volumes.values()))
        self.layer_meta = {n: (v.dtype, v.num_channels) for n, v in volumes.items()}
        self.bounds = reference.bounds
        self.chunk_shape = serving_blocks(reference.chunk_shape, reference.shape, block_shape)
        self.voxel_size = reference.voxel_size
        self.mode = mode
        self.client_cache_mb = client_cache_mb
        self.shards = plan_shards(self.bounds, self.chunk_shape, num_servers)
        self._owner = {box.start: i for i, shard in enumerate(self.shards) for box in shard}
        self.max_retries = max_retries
        self.stats_ = PoolStats()
        self._cache = ChunkCache(int(client_cache_mb * 2**20))
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
                    self.chunk_shape,
                    mode,
                )
            )
        ray.get([s.ping.remote() for s in self.servers])

    # -------------------------------------------------------------- routing
    def owner_of(self, crop: Box) -> int:
        """The server owning the chunk under a crop's centre ("crops" mode routing)."""
        centre = [
            min((a + b) // 2, hi - 1)
            for a, b, hi in zip(crop.start, crop.stop, self.bounds.stop, strict=True)
        ]
        chunk = next(
            chunks_touching(Box.from_shape((1, 1, 1), centre), self.chunk_shape, self.bounds)
        )
        return self._owner[chunk.start]

    def _call(self, server: int, payload: Any) -> ray.ObjectRef:
        actor = self.servers[server]
        if self.mode == "chunks":
            return actor.chunk_refs.remote(payload)
        return actor.get_crops.remote(payload)

    def _requests(self, crops: np.ndarray) -> list[tuple[int, Any, ray.ObjectRef]]:
        if self.mode == "crops":
            by_server: dict[int, list[int]] = {}
            for index, crop in enumerate(crops):
                by_server.setdefault(self.owner_of(Box.from_list(crop)), []).append(index)
            return [
                (server, (idx, crops[idx].tolist()), self._call(server, crops[idx].tolist()))
                for server, idx in by_server.items()
            ]
        needed: dict[int, set[tuple[int, int, int]]] = {}
        for crop in crops:
            for start, _, _ in crop_pieces(crop, self.chunk_shape, self.bounds):
                if self._cache.get((next(iter(self.layers)), start)) is None:
                    needed.setdefault(self._owner[start], set()).add(start)
        calls = []
        for server, starts in needed.items():
            payload = [list(s) for s in sorted(starts)]
            calls.append((server, payload, self._call(server, payload)))
        return calls

    def _reply(self, server: int, payload: Any, ref: ray.ObjectRef) -> Any:
        """Wait for one reply (and the chunks it names), re-asking while its server restarts."""
        for attempt in range(self.max_retries + 1):
            try:
                reply = ray.get(ref)
                if self.mode == "chunks":
                    reply = {name: ray.get(refs) for name, refs in reply.items()}
                return reply
            except _RETRYABLE as err:
                if attempt == self.max_retries:
                    raise VolumeError(
                        f"chunk server {server} failed {attempt + 1} times: {err}"
                    ) from err
                self.stats_.retries += 1
                log.warning("chunk server %d died (%s); retrying", server, type(err).__name__)
                time.sleep(min(0.2 * 2**attempt, 2.0))
                ref = self._call(server, payload if self.mode == "chunks" else payload[1])
        raise AssertionError("unreachable")

    def _finish(self, pending: _Pending) -> dict[str, np.ndarray]:
        crops = pending.crops
        if self.mode == "chunks":
            for server, payload, ref in pending.calls:
                arrays = self._reply(server, payload, ref)
                for name, chunks in arrays.items():
                    for start, array in zip(payload, chunks, strict=True):
                        self._cache.put((name, tuple(start)), array)
            local: dict[tuple[str, tuple[int, int, int]], np.ndarray] = {}

            def chunk(name: str, start: tuple[int, int, int]) -> np.ndarray:
                key = (name, start)
                array = local.get(key)
                if array is None:
                    array = self._cache.get(key)
                    if array is None:  # evicted by this very batch: ask again, synchronously
                        server = self._owner[start]
                        array = self._reply(
                            server, [list(start)], self._call(server, [list(start)])
                        )[name][0]
                    local[key] = array
                return array

            result = assemble(crops, self.layer_meta, self.chunk_shape, self.bounds, chunk)
        elif len(pending.calls) == 1:
            server, payload, ref = pending.calls[0]
            result = self._reply(server, payload, ref)
        else:
            result = {}
            for server, payload, ref in pending.calls:
                part = self._reply(server, payload, ref)
                for name, array in part.items():
                    if name not in result:
                        result[name] = np.empty((len(crops), *array.shape[1:]), array.dtype)
                    result[name][payload[0]] = array
        self.stats_.batches += 1
        self.stats_.crops += len(crops)
        return result

    def get_crops(self, crops: Sequence[Box]) -> dict[str, np.ndarray]:
        """Crops in request order, stacked per layer (``{name: [B, ...]}``)."""
        return next(self.stream([list(crops)], max_in_flight=1))

    def stream(
        self, batches: Iterable[Sequence[Box]], max_in_flight: int = 4
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield each batch of crops in order, keeping at most ``max_in_flight`` batches pending.

        Requests for the next batches are in flight while the current one is assembled
        (backpressure: the object store never holds more than that many batches' replies).
        """
        pending: list[_Pending] = []
        source = iter(batches)
        exhausted = False
        while True:
            while not exhausted and len(pending) < max_in_flight:
                try:
                    boxes = list(next(source))
                except StopIteration:
                    exhausted = True
                    break
                crops = check_crops([b.to_list() for b in boxes], self.bounds)
                pending.append(_Pending(crops, self._requests(crops)))
            if not pending:
                return
            yield self._finish(pending.pop(0))

    # -------------------------------------------------------------- management
    def server_stats(self) -> list[dict[str, Any]]:
        return ray.get([s.stats.remote() for s in self.servers])

    def shutdown(self) -> None:
        for server in self.servers:
            ray.kill(server, no_restart=True)
        self.servers = []
        self._cache.clear()

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """``with ServerPool(...) as pool:`` stops the servers however the block ends."""
        self.shutdown()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # mapped chunks stay in this process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.stats_ = PoolStats()
        self._cache = ChunkCache(int(self.client_cache_mb * 2**20))
