"""Crop sampling: boxes inside the region, seeded per (seed, rank, epoch), rejection by
foreground (from the crop's labels or the labels layer's manifest), and the CropDataset that
streams them from chunk servers, resumable mid-epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroray.errors import ConfigError
from neuroray.platform.box import Box, chunk_grid, chunks_touching
from neuroray.platform.ingest import ingest, read_manifest
from neuroray.platform.sampler import (
    MAX_DRAWS_PER_CROP,
    CropDataset,
    CropSampler,
    SamplerConfig,
)
from neuroray.platform.server import ServerPool
from neuroray.platform.volume import create_volume

BOUNDS = Box((0, 0, 0), (50, 100, 200))


def take(sampler: CropSampler, n: int, rank: int = 0, epoch: int = 0) -> list[Box]:
    boxes = sampler.boxes(rank, epoch)
    return [next(boxes) for _ in range(n)]


# ---------------------------------------------------------------------- where crops are drawn
@pytest.mark.parametrize("seed", range(5))
def test_crops_have_the_crop_shape_and_lie_inside_the_roi_and_the_bounds(seed):
    roi = Box((10, -20, 150), (40, 60, 260))  # reaches outside the bounds in y and x
    sampler = CropSampler(BOUNDS, (8, 32, 32), seed=seed, roi=roi)
    assert sampler.region == Box((10, 0, 150), (40, 60, 200))
    boxes = take(sampler, 200)
    assert all(box.shape == (8, 32, 32) for box in boxes)
    assert all(sampler.region.contains(box) for box in boxes)
    # the whole region is reachable: first and last positions on every axis are drawn
    starts = np.array([box.start for box in boxes])
    stops = np.array([box.stop for box in boxes])
    assert (starts.min(0) < np.array([12, 4, 154])).all()
    assert (stops.max(0) > np.array([38, 56, 196])).all()


def test_a_crop_the_size_of_the_region_is_the_region():
    region = Box((0, 0, 0), (8, 32, 32))
    assert set(take(CropSampler(BOUNDS, (8, 32, 32), roi=region), 10)) == {region}


def test_impossible_samplers_are_refused():
    with pytest.raises(ConfigError, match="min_foreground"):
        CropSampler(BOUNDS, (8, 32, 32), min_foreground=1.5)
    with pytest.raises(ConfigError, match="crop_shape"):
        CropSampler(BOUNDS, (0, 32, 32))
    with pytest.raises(ValueError, match="roi"):
        SamplerConfig(roi=(10, 0, 0, 5, 100, 100))


def test_same_seed_same_stream_and_ranks_differ():
    bounds = Box((0, 0, 0), (50, 100, 200))
    a = CropSampler(bounds, (8, 32, 32), seed=7)
    b = CropSampler(bounds, (8, 32, 32), seed=7)
    take = lambda s, r, e: [next(it) for it in [s.boxes(r, e)] for _ in range(20)]  # noqa: E731
    assert take(a, 0, 0) == take(b, 0, 0)
    assert take(a, 0, 0) != take(a, 1, 0)
    assert take(a, 0, 0) != take(a, 0, 1)
    roi = Box((0, 0, 0), (20, 100, 200))
    inside = CropSampler(bounds, (8, 32, 32), seed=7, roi=roi)
    assert all(roi.contains(box) for box in take(inside, 0, 0))
    with pytest.raises(ConfigError, match="does not fit"):
        CropSampler(bounds, (60, 32, 32))


def test_dataset_rejection_honours_the_threshold(pool, gala):
    _, arrays = gala
    threshold = 0.93  # gala (and its stand-in) has 7-9% boundary (label 0) voxels, so many crops fall below
    sampler = CropSampler(pool.bounds, (8, 24, 24), seed=1, min_foreground=threshold)
    dataset = CropDataset(pool, sampler, samples_per_epoch=40, crops_per_request=8)
    samples = list(dataset)
    assert len(samples) == 40
    for sample in samples:
        box = Box.from_list(sample["box"].tolist())
        labels = arrays["labels"][box.slices]
        assert np.count_nonzero(labels) / labels.size >= threshold
        np.testing.assert_array_equal(sample["labels"].numpy(), labels)
        np.testing.assert_allclose(
            sample["image"][0].numpy() * 255, arrays["image"][box.slices], atol=1e-3
        )
    # the stream before rejection contains crops under the threshold: rejection did happen
    drawn = [next(b) for b in [sampler.boxes(0, 0)] for _ in range(200)]
    fractions = [np.count_nonzero(arrays["labels"][b.slices]) / b.size for b in drawn]
    assert min(fractions) < threshold


def test_manifest_rejection_draws_from_foreground_chunks(pool, gala, gala_chunks):
    layers, arrays = gala
    manifest = read_manifest(layers["labels"])
    threshold = 0.95
    sampler = CropSampler(
        pool.bounds, (8, 16, 16), seed=2, min_foreground=threshold, manifest=manifest
    )
    fractions = dict(
        zip(
            [b.start for b in chunk_grid(pool.bounds, gala_chunks)],
            manifest.column("foreground_fraction").to_pylist(),
            strict=True,
        )
    )
    for box in [next(b) for b in [sampler.boxes(0, 0)] for _ in range(50)]:
        touched = [c.start for c in chunks_touching(box, gala_chunks, pool.bounds)]
        assert any(fractions[start] >= threshold for start in touched)
    assert min(fractions.values()) < threshold  # some chunks were excluded


def test_resumed_dataset_continues_the_same_stream(pool):
    sampler = CropSampler(pool.bounds, (8, 16, 16), seed=5)
    full = [s["box"].tolist() for s in CropDataset(pool, sampler, samples_per_epoch=20)]
    first = CropDataset(pool, sampler, samples_per_epoch=20)
    head = [s["box"].tolist() for _, s in zip(range(7), first, strict=False)]
    resumed = CropDataset(pool, sampler, samples_per_epoch=20)
    resumed.load_state_dict(first.state_dict())
    assert first.state_dict() == {"epoch": 0, "consumed": 7}
    tail = [s["box"].tolist() for s in resumed]
    assert head + tail == full


def test_resumed_dataset_with_augmentation_continues_the_same_samples(pool):
    from neuroray.platform.augment import build_pipeline

    sampler = CropSampler(pool.bounds, (16, 64, 64), seed=5)

    def dataset():
        return CropDataset(pool, sampler, samples_per_epoch=12, augment=build_pipeline("em"))

    full = list(dataset())
    resumed = dataset()
    resumed.load_state_dict({"epoch": 0, "consumed": 5})
    tail = list(resumed)
    assert [s["box"].tolist() for s in tail] == [s["box"].tolist() for s in full[5:]]
    for a, b in zip(tail, full[5:], strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])


# ---------------------------------------------------------------------- rejection
def test_crops_are_accepted_by_their_labelled_fraction():
    sampler = CropSampler(BOUNDS, (2, 2, 2), min_foreground=0.5)
    labels = np.zeros((2, 2, 2), np.uint32)
    labels.flat[:3] = 7
    assert not sampler.accepts(labels)  # 3 / 8 labelled
    labels.flat[3] = 7
    assert sampler.accepts(labels)  # 4 / 8: at the threshold
    assert sampler.accepts(None)  # nothing to judge by (an unlabelled layer)
    assert CropSampler(BOUNDS, (2, 2, 2)).accepts(np.zeros((2, 2, 2)))  # no threshold


def test_rejections_in_a_row_give_up_with_advice():
    sampler = CropSampler(BOUNDS, (8, 32, 32), min_foreground=0.5, max_draws_per_crop=10)
    sampler.check_rejections(9)
    with pytest.raises(ConfigError, match="10 crops in a row") as raised:
        sampler.check_rejections(10)
    assert "foreground_from=manifest" in str(raised.value)


def test_manifest_candidates_are_the_chunks_that_reach_the_threshold(tmp_path):
    labels = np.zeros((8, 32, 32), np.uint32)
    labels[:4, :16, :16] = 1  # one full chunk of the (4, 16, 16) grid
    labels[4:, 16:, 16:][::2] = 2  # half of another
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "image.npy", labels.astype(np.uint8))
    ingest(str(tmp_path / "labels.npy"), str(tmp_path / "labels"), chunk_shape=(4, 16, 16),
           labels=True, progress=False)
    ingest(str(tmp_path / "image.npy"), str(tmp_path / "image"), chunk_shape=(4, 16, 16),
           labels=False, progress=False)
    bounds = Box((0, 0, 0), labels.shape)
    manifest = read_manifest(str(tmp_path / "labels"))

    full = CropSampler(bounds, (2, 8, 8), min_foreground=0.9, manifest=manifest, seed=3)
    assert full.candidates == [Box((0, 0, 0), (4, 16, 16))]
    assert all(not box.intersect(full.candidates[0]).empty for box in take(full, 100))
    half = CropSampler(bounds, (2, 8, 8), min_foreground=0.5, manifest=manifest)
    assert sorted(box.start for box in half.candidates) == [(0, 0, 0), (4, 16, 16)]
    assert half.accepts(np.zeros((2, 8, 8)))  # the manifest already chose: crops are not judged

    unlabelled = Box((4, 0, 0), (8, 16, 16))  # one chunk, no foreground
    with pytest.raises(ConfigError, match="no chunk"):
        CropSampler(bounds, (2, 8, 8), min_foreground=0.5, manifest=manifest, roi=unlabelled)
    with pytest.raises(ConfigError, match="labels layer's manifest"):
        CropSampler(bounds, (2, 8, 8), min_foreground=0.5,
                    manifest=read_manifest(str(tmp_path / "image")))


# moved from test_validation.py
@pytest.mark.timeout(300)  # before the bound, this loop never ended
def test_unreachable_foreground_threshold_stops_with_advice(ray_session, tmp_path):
    layers = {}
    for name, data in (("image", np.ones((8, 32, 32), np.uint8)),
                       ("labels", np.zeros((8, 32, 32), np.uint32))):
        volume = create_volume(tmp_path / name, shape=data.shape, dtype=data.dtype,
                               chunk_shape=(8, 8, 8))
        volume[:] = data
        layers[name] = str(tmp_path / name)
    pool = ServerPool(layers, num_servers=1, cache_mb=4)
    try:
        sampler = CropSampler(pool.bounds, (4, 16, 16), seed=0, min_foreground=0.5)
        dataset = CropDataset(pool, sampler, samples_per_epoch=1, crops_per_request=50)
        with pytest.raises(ConfigError, match="foreground_from=manifest") as raised:
            next(iter(dataset))
        assert f"{MAX_DRAWS_PER_CROP} crops in a row" in str(raised.value)
        assert "lower sampler.min_foreground" in str(raised.value)
    finally:
        pool.shutdown()
