"""Chunk servers on EM layers (fib_gala_train, or its synthetic stand-in): exact crops, shard
plans, fault tolerance. The crop streams they serve are tested in test_sampler.py."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from neuroray.errors import VolumeError
from neuroray.platform.augment import as_float_image
from neuroray.platform.box import Box, chunk_grid
from neuroray.platform.sampler import CropDataset, CropSampler
from neuroray.platform.server import ChunkCache, ServerPool, plan_shards, serving_blocks

CHUNKS = (16, 32, 64)  # a chunk shape for the shard plans (the gala layers: conftest.py)


def test_shard_plan_is_balanced_contiguous_and_complete():
    bounds = Box((0, 0, 0), (50, 100, 200))
    chunks = set(b.start for b in chunk_grid(bounds, CHUNKS))
    for n in (1, 2, 3, 5):
        shards = plan_shards(bounds, CHUNKS, n)
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
        assert sorted(b.start for s in shards for b in s) == sorted(chunks)
    two = plan_shards(bounds, CHUNKS, 2)
    # a slab split: the shards do not interleave along the split axis
    assert max(b.start[0] for b in two[0]) < min(b.start[0] for b in two[1])


def test_serving_blocks_group_whole_chunks():
    assert serving_blocks((64, 64, 64), (250, 250, 250)) == (64, 256, 256)
    assert serving_blocks((16, 32, 64), (50, 100, 200)) == (64, 128, 256)  # not past the volume
    assert serving_blocks((4, 128, 128), (20, 1024, 1024)) == (20, 256, 256)
    with pytest.raises(VolumeError, match="multiple of the layer's chunks"):
        serving_blocks((16, 32, 64), (50, 100, 200), (16, 48, 64))


def test_default_blocks_serve_exact_crops(ray_session, gala):
    layers, arrays = gala
    pool = ServerPool(layers, num_servers=1, cache_mb=16)
    try:
        assert pool.chunk_shape == (64, 128, 256)
        crop = Box((3, 5, 7), (35, 77, 199))
        np.testing.assert_array_equal(
            pool.get_crops([crop])["labels"][0], arrays["labels"][crop.slices]
        )
    finally:
        pool.shutdown()


def test_lru_respects_its_budget():
    cache = ChunkCache(budget_bytes=3000)
    cache.put("big", np.zeros(4000, np.uint8))
    assert cache.get("big") is None and cache.bytes == 0  # over budget: served, not cached
    for i in range(10):
        cache.put(i, np.zeros(1000, np.uint8))
        assert cache.bytes <= 3000
    assert cache.get(9) is not None and cache.get(0) is None
    cache.get(7)
    cache.put(10, np.zeros(1000, np.uint8))
    assert cache.get(7) is not None and cache.get(8) is None  # least recently used went first


def test_crops_equal_the_source_inside_across_chunks_and_shards(pool, gala):
    _, arrays = gala
    shard_edge = min(b.start[0] for b in pool.shards[1])
    crops = [
        Box((1, 2, 3), (9, 30, 60)),  # inside one chunk
        Box((10, 20, 50), (30, 70, 150)),  # across several chunks
        Box((shard_edge - 5, 0, 0), (shard_edge + 5, 100, 200)),  # across the two shards
        Box((0, 0, 0), (50, 100, 200)),  # the whole volume
    ]
    for crop in crops:
        out = pool.get_crops([crop])
        np.testing.assert_array_equal(out["image"][0], arrays["image"][crop.slices], str(crop))
        np.testing.assert_array_equal(out["labels"][0], arrays["labels"][crop.slices], str(crop))
        assert out["labels"].dtype == np.uint32
    routed = {pool.owner_of(Box((0, 0, 0), (8, 8, 8))), pool.owner_of(Box((42, 0, 0), (50, 8, 8)))}
    assert routed == {0, 1}
    stats = pool.server_stats()
    if pool.mode == "crops":  # the cross-shard crop's owner read the other shard's rim itself
        assert sum(s["borrowed_reads"] for s in stats) > 0
    else:  # every chunk was asked of its owner and decoded once
        assert sum(s["borrowed_reads"] for s in stats) == 0
        chunks = list(chunk_grid(pool.bounds, pool.chunk_shape))
        assert sum(s["reads"] for s in stats) <= 2 * len(chunks)
    assert all(s["shared_cached_bytes"] <= s["budget_bytes"] for s in stats)
    assert all(s["heap_cached_bytes"] <= s["budget_bytes"] for s in stats)


def test_mixed_batches_keep_request_order(pool, gala):
    _, arrays = gala
    rng = np.random.default_rng(3)
    crops = [Box.from_shape((8, 16, 16), rng.integers(0, (42, 84, 184))) for _ in range(40)]
    batches = [crops[i : i + 8] for i in range(0, 40, 8)]
    for batch, out in zip(batches, pool.stream(batches, max_in_flight=3), strict=True):
        for crop, image in zip(batch, out["image"], strict=True):
            np.testing.assert_array_equal(image, arrays["image"][crop.slices])


def test_bad_requests_fail_clearly(pool):
    with pytest.raises(VolumeError, match="outside the layer bounds"):
        pool.get_crops([Box((45, 0, 0), (55, 10, 10))])


@pytest.mark.parametrize("mode", ["chunks", "crops"])
def test_killed_server_loses_and_duplicates_nothing(ray_session, gala, gala_chunks, mode):
    layers, arrays = gala
    pool = ServerPool(
        layers,
        num_servers=2,
        cache_mb=4,
        max_restarts=3,
        mode=mode,
        client_cache_mb=1,
        block_shape=gala_chunks,
    )
    try:
        sampler = CropSampler(pool.bounds, (8, 32, 32), seed=11)
        expected = [next(b) for b in [sampler.boxes(0, 0)] for _ in range(60)]

        def dataset():
            return CropDataset(pool, sampler, samples_per_epoch=60, crops_per_request=4, prefetch=3)

        undisturbed = list(dataset())  # the same seed, no server killed
        seen = []
        victim_pid = ray.get(pool.servers[0].ping.remote())
        for i, sample in enumerate(dataset()):
            if i == 10:
                ray.kill(pool.servers[0], no_restart=False)
            box = Box.from_list(sample["box"].tolist())
            np.testing.assert_array_equal(sample["labels"].numpy(), arrays["labels"][box.slices])
            np.testing.assert_array_equal(  # image values too, exactly as served from the source
                sample["image"][0].numpy(), as_float_image(arrays["image"][box.slices])
            )
            clean = undisturbed[i]
            assert sample.keys() == clean.keys()
            for key in clean:  # bit for bit the undisturbed stream's sample
                assert sample[key].dtype == clean[key].dtype, (i, key)
                assert torch.equal(sample[key], clean[key]), (i, key)
            seen.append(box)
        assert seen == expected and len(undisturbed) == 60  # none lost or duplicated, same order
        assert pool.stats_.retries >= 1
        assert ray.get(pool.servers[0].ping.remote()) != victim_pid  # it was restarted
    finally:
        pool.shutdown()
