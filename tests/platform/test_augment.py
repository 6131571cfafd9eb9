"""Augmentations: image/label alignment, determinism, read-only inputs, pipelines from specs."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import yaml
from scipy import ndimage

from neuroray.config import from_json, to_json, validate
from neuroray.errors import ConfigError, RegistryError
from neuroray.platform.augment import (
    AUGMENTATIONS,
    DEFAULT_PIPELINES,
    AugmentError,
    Compose,
    MSConAugmentConfig,
    Sample,
    build_pipeline,
    default_pipeline,
    warp,
)

ALL = AUGMENTATIONS.names()
GEOMETRIC = [name for name in ALL if AUGMENTATIONS.get(name).geometric]
IMAGE_ONLY = [name for name in ALL if not AUGMENTATIONS.get(name).geometric]
EXACT = {"flip", "transpose", "rot90", "misalignment"}  # index-only maps: no interpolation
BRIGHT, DARK = 0.8, 0.2


def voronoi_labels(shape: tuple[int, int, int], cells: int, voxel: tuple, seed: int) -> np.ndarray:
    """Dense touching instance labels (like FIB-SEM ground truth): nearest of random seeds."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.uint32)
    for i in range(cells):
        seeds[tuple(int(rng.integers(n)) for n in shape)] = i + 1
    _, nearest = ndimage.distance_transform_edt(seeds == 0, sampling=voxel, return_indices=True)
    return seeds[tuple(nearest)] * 7 + 3  # arbitrary, non-consecutive ids


def membrane_sample(isotropic: bool, channels: int | None = None) -> Sample:
    """Image dark exactly where a voxel touches another label: the membrane is the boundary.

    Anisotropic (ssTEM-like): membranes are drawn in-plane. Isotropic cube: in 3D, so z-swaps
    of the transpose are checked too.
    """
    if isotropic:
        shape, voxel, window = (20, 20, 20), (10.0, 10.0, 10.0), (3, 3, 3)
    else:
        shape, voxel, window = (16, 48, 48), (40.0, 10.0, 10.0), (1, 3, 3)
    labels = voronoi_labels(shape, 10, voxel, seed=0)
    dark = ndimage.maximum_filter(labels, window) != ndimage.minimum_filter(labels, window)
    image = np.where(dark, DARK, BRIGHT).astype(np.float32)
    if channels is not None:
        image = np.stack([image] * channels)
    return Sample(image=image, labels=labels, mask=labels % 2 == 0, voxel_size=voxel)


def read_only(sample: Sample) -> Sample:
    """Like a crop straight out of Ray's shared memory."""
    for array in (sample.image, sample.labels, sample.mask):
        if array is not None:
            array.flags.writeable = False
    return sample


def boundary_on_membrane(image: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of in-plane label-boundary voxels that are dark in the image."""
    boundary = np.zeros(labels.shape, bool)
    along_y = labels[:, 1:, :] != labels[:, :-1, :]
    along_x = labels[:, :, 1:] != labels[:, :, :-1]
    boundary[:, 1:, :] |= along_y
    boundary[:, :-1, :] |= along_y
    boundary[:, :, 1:] |= along_x
    boundary[:, :, :-1] |= along_x
    assert boundary.any()
    return float(np.mean(image[boundary] < (BRIGHT + DARK) / 2))


def always(name: str, **params) -> object:
    return AUGMENTATIONS.get(name)(p=1.0, **params)


def same(a: Sample, b: Sample) -> bool:
    return all(
        (x is None and y is None) or np.array_equal(x, y)
        for x, y in ((a.image, b.image), (a.labels, b.labels), (a.mask, b.mask))
    )


def test_registry_holds_the_transforms_the_pipelines_need():
    wanted = {
        "flip", "transpose", "rot90", "contrast", "brightness", "gamma", "gaussian_noise",
        "gaussian_blur", "cutout", "missing_sections", "partially_missing_sections",
        "misalignment", "elastic", "rescale",
    }  # fmt: skip
    assert wanted <= set(ALL)
    for specs in DEFAULT_PIPELINES.values():
        assert {spec["name"] for spec in specs} <= set(ALL)


# --- properties of every registered transform -------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("channels", [None, 2])
def test_shapes_dtypes_kept_and_read_only_inputs_untouched(name, channels):
    sample = read_only(membrane_sample(isotropic=False, channels=channels))
    before = [sample.image.copy(), sample.labels.copy(), sample.mask.copy()]
    for seed in range(3):
        out = always(name)(sample, np.random.default_rng(seed))
        assert out.image.shape == sample.image.shape and out.image.dtype == np.float32
        assert out.labels.shape == sample.labels.shape and out.labels.dtype == sample.labels.dtype
        assert out.mask.shape == sample.mask.shape and out.mask.dtype == bool
        assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    for original, now in zip(before, (sample.image, sample.labels, sample.mask), strict=True):
        np.testing.assert_array_equal(original, now)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_a_seed(name):
    sample = read_only(membrane_sample(isotropic=True))  # a cube: transpose has 5 choices
    transform = always(name)
    first = transform(sample, np.random.default_rng(123))
    assert same(first, transform(sample, np.random.default_rng(123)))
    others = [transform(sample, np.random.default_rng(seed)) for seed in range(5)]
    assert any(not same(first, other) for other in others)


@pytest.mark.parametrize("name", ALL)
def test_probability_zero_never_fires_and_one_changes_the_image(name):
    sample = membrane_sample(isotropic=False)
    never = AUGMENTATIONS.get(name)(p=0.0)
    assert all(same(never(sample, np.random.default_rng(s)), sample) for s in range(5))
    fired = [always(name)(sample, np.random.default_rng(s)) for s in range(5)]
    assert any(not np.array_equal(out.image, sample.image) for out in fired)


# --- geometric transforms keep image and labels aligned ---------------------------------------


@pytest.mark.parametrize("isotropic", [False, True], ids=["anisotropic", "isotropic"])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_transform_keeps_label_boundaries_on_the_membrane(name, isotropic):
    sample = membrane_sample(isotropic)
    assert boundary_on_membrane(sample.image, sample.labels) == 1.0
    moved = False
    for seed in range(6):
        out = always(name)(sample, np.random.default_rng(seed))
        score = boundary_on_membrane(out.image, out.labels)
        assert score == 1.0 if name in EXACT else score >= 0.9, (seed, score)
        # the mask is resampled at exactly the same places as the labels
        np.testing.assert_array_equal(out.mask, out.labels % 2 == 0)
        moved |= not np.array_equal(out.labels, sample.labels)
    assert moved, f"{name} never moved the labels"


def test_the_alignment_check_catches_labels_off_by_one_voxel():
    sample = membrane_sample(isotropic=False)
    for shift in (1, 2):
        assert boundary_on_membrane(sample.image, np.roll(sample.labels, shift, axis=2)) < 0.7
    misaligned = always("misalignment", max_shift=3)(sample, np.random.default_rng(0))
    assert boundary_on_membrane(misaligned.image, sample.labels) < 0.9


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_transform_moves_every_channel_alike(name):
    sample = membrane_sample(isotropic=False, channels=3)
    out = always(name)(sample, np.random.default_rng(4))
    for channel in out.image[1:]:
        np.testing.assert_array_equal(channel, out.image[0])


def test_transpose_never_moves_z_when_it_is_anisotropic_or_unknown():
    aniso = membrane_sample(isotropic=False)
    for sample in (aniso, aniso.replace(voxel_size=None)):
        for seed in range(8):
            out = always("transpose")(sample, np.random.default_rng(seed))
            np.testing.assert_array_equal(out.labels, sample.labels.transpose(0, 2, 1))


def test_transpose_swaps_z_when_isotropic():
    sample = membrane_sample(isotropic=True)
    seen = set()
    for seed in range(30):
        out = always("transpose")(sample, np.random.default_rng(seed))
        perms = [p for p in _perms() if np.array_equal(out.labels, sample.labels.transpose(p))]
        assert len(perms) == 1 and perms[0] != (0, 1, 2)
        seen.add(perms[0])
    assert seen == set(_perms()) - {(0, 1, 2)}


def _perms() -> list[tuple[int, int, int]]:
    return list(itertools.permutations(range(3)))


def test_rot90_keeps_the_shape_of_a_non_square_crop():
    labels = voronoi_labels((4, 12, 20), 5, (4, 1, 1), seed=1)
    sample = Sample(image=np.zeros(labels.shape, np.float32), labels=labels)
    out = always("rot90")(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out.labels, labels[:, ::-1, ::-1])


def test_misalignment_shifts_a_slab_and_mirrors_the_exposed_border():
    sample = membrane_sample(isotropic=False)
    out = always("misalignment", max_shift=5, mode="translation")(sample, np.random.default_rng(1))
    changed = [z for z in range(16) if not np.array_equal(out.labels[z], sample.labels[z])]
    start = changed[0]
    assert changed == list(range(start, 16)) and start >= 1  # one slab, to the end
    matches = [
        (dy, dx)
        for dy in range(-5, 6)
        for dx in range(-5, 6)
        if np.array_equal(out.labels[start:], _mirror_shift(sample.labels[start:], dy, dx))
    ]
    assert len(matches) == 1
    dy, dx = matches[0]
    np.testing.assert_array_equal(out.image[start:], _mirror_shift(sample.image[start:], dy, dx))

    slip = always("misalignment", mode="slip")(sample, np.random.default_rng(2))
    moved = [z for z in range(16) if not np.array_equal(slip.labels[z], sample.labels[z])]
    assert len(moved) == 1


def _mirror_shift(volume: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = volume[y - dy, x - dx], mirrored (numpy "symmetric") outside."""
    m = 8
    padded = np.pad(volume, [(0, 0), (m, m), (m, m)], mode="symmetric")
    return padded[:, m - dy : m - dy + volume.shape[1], m - dx : m - dx + volume.shape[2]]


def test_warp_with_a_constant_integer_displacement_is_a_mirrored_shift():
    sample = membrane_sample(isotropic=False)
    sample = sample.replace(image=np.random.default_rng(0).random(sample.shape, np.float32))
    dy = np.full(sample.shape, 3.0, np.float32)
    dx = np.full(sample.shape, -2.0, np.float32)
    out = warp(sample, None, dy, dx)  # samples at voxel + displacement
    np.testing.assert_allclose(out.image, _mirror_shift(sample.image, -3, 2), atol=1e-6)
    np.testing.assert_array_equal(out.labels, _mirror_shift(sample.labels, -3, 2))
    out3d = warp(sample, np.zeros(sample.shape, np.float32), dy, dx)
    np.testing.assert_allclose(out3d.image, out.image, atol=1e-6)
    np.testing.assert_array_equal(out3d.labels, out.labels)


def test_elastic_with_zero_magnitude_is_the_identity():
    sample = membrane_sample(isotropic=False)
    out = always("elastic", magnitude=0.0)(sample, np.random.default_rng(0))
    assert same(out, sample)


# --- intensity and artefact transforms leave labels alone -------------------------------------


@pytest.mark.parametrize("name", IMAGE_ONLY)
def test_image_only_transform_leaves_labels_and_mask_untouched(name):
    sample = read_only(membrane_sample(isotropic=False))
    for seed in range(3):
        out = always(name)(sample, np.random.default_rng(seed))
        np.testing.assert_array_equal(out.labels, sample.labels)
        np.testing.assert_array_equal(out.mask, sample.mask)


def _gradient_sample() -> Sample:
    image = np.linspace(0.0, 1.0, 8 * 32 * 32, dtype=np.float32).reshape(8, 32, 32)
    return Sample(image=image)


def test_intensity_known_answers():
    sample = _gradient_sample()
    rng = np.random.default_rng(0)
    bright = always("brightness", shift=0.1)(sample, rng).image
    np.testing.assert_allclose(bright, np.clip(sample.image + 0.1, 0, 1), atol=1e-6)
    gamma = always("gamma", gamma=2.0)(sample, rng).image
    np.testing.assert_allclose(gamma, sample.image**2, atol=1e-6)
    flat = always("contrast", factor=0.0)(sample, rng).image
    np.testing.assert_allclose(flat, sample.image.mean(), atol=1e-6)
    same_contrast = always("contrast", factor=1.0)(sample, rng).image
    np.testing.assert_allclose(same_contrast, sample.image, atol=1e-6)


def test_noise_has_the_requested_sigma_and_blur_smooths():
    sample = Sample(image=np.full((8, 64, 64), 0.5, np.float32))
    noisy = always("gaussian_noise", sigma=0.05)(sample, np.random.default_rng(0)).image
    assert abs(float((noisy - 0.5).std()) - 0.05) < 0.002
    blurred = always("gaussian_blur", sigma=2.0)(
        sample.replace(image=noisy), np.random.default_rng(0)
    )
    assert blurred.image.std() < 0.3 * noisy.std()
    assert abs(float(blurred.image.mean()) - float(noisy.mean())) < 1e-3
    # in-plane only by default: sections do not mix
    one_section = np.zeros((5, 16, 16), np.float32)
    one_section[2] = 1.0
    out = always("gaussian_blur", sigma=1.0)(Sample(one_section), np.random.default_rng(0))
    assert out.image[[0, 1, 3, 4]].max() == 0.0
    out = always("gaussian_blur", sigma=1.0, sigma_z=1.0)(
        Sample(one_section), np.random.default_rng(0)
    )
    assert out.image[1].min() > 0.0


def test_section_artefacts_hit_only_the_chosen_sections():
    sample = _gradient_sample()
    missing = always("missing_sections", count=2, fill=0.0)(sample, np.random.default_rng(0))
    blank = [z for z in range(8) if not np.array_equal(missing.image[z], sample.image[z])]
    assert len(blank) == 2 and all(missing.image[z].max() == 0.0 for z in blank)

    partial = always("partially_missing_sections", count=1, width=6.0, fill=0.0)
    out = partial(sample, np.random.default_rng(0)).image
    hit = [z for z in range(8) if not np.array_equal(out[z], sample.image[z])]
    assert len(hit) == 1
    changed = out[hit[0]] != sample.image[hit[0]]
    assert np.all(out[hit[0]][changed] == 0.0) and 0 < changed.mean() < 0.5

    low = always("low_contrast_sections", count=1, factor=0.25)(sample, np.random.default_rng(0))
    hit = [z for z in range(8) if not np.allclose(low.image[z], sample.image[z])]
    assert len(hit) == 1
    np.testing.assert_allclose(
        low.image[hit[0]].std(), 0.25 * sample.image[hit[0]].std(), rtol=1e-3
    )

    noise = np.random.default_rng(0).random((8, 32, 32), np.float32)
    blur = always("motion_blur", count=3)(Sample(noise), np.random.default_rng(0)).image
    assert sum(not np.array_equal(blur[z], noise[z]) for z in range(8)) == 3


def test_cutout_fills_boxes_and_keeps_the_rest():
    sample = _gradient_sample()
    out = always("cutout", count=2, size=0.25, fill=0.5)(sample, np.random.default_rng(0)).image
    changed = out != sample.image
    assert changed.any() and np.all(out[changed] == 0.5)
    assert changed.mean() <= 2 * 0.25**3 + 1e-9


# --- the image contract ----------------------------------------------------------------------


def test_uint8_images_become_float32_in_unit_range():
    image = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    out = build_pipeline([])(Sample(image), 0).image
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, image / 255.0, atol=1e-6)
    wide = build_pipeline([])(Sample(image.astype(np.uint16) * 257), 0).image
    np.testing.assert_allclose(wide, image / 255.0, atol=1e-6)
    with pytest.raises(AugmentError, match="unsigned ints"):
        always("flip")(Sample(image.astype(np.int16)), np.random.default_rng(0))


def test_bad_samples_are_rejected_with_a_reason():
    with pytest.raises(AugmentError, match="same box"):
        Sample(np.zeros((4, 8, 8), np.float32), labels=np.zeros((4, 8, 9), np.uint32))
    with pytest.raises(AugmentError, match="integer"):
        Sample(np.zeros((4, 8, 8), np.float32), labels=np.zeros((4, 8, 8), np.float32))
    with pytest.raises(AugmentError, match="C, z, y, x"):
        Sample(np.zeros((8, 8), np.float32))


def test_pipeline_output_is_fresh_even_when_nothing_fires():
    sample = read_only(membrane_sample(isotropic=False))
    out = build_pipeline([{"name": "flip", "p": 0.0}])(sample, 0)
    for new, old in zip(
        (out.image, out.labels, out.mask), (sample.image, sample.labels, sample.mask), strict=True
    ):
        assert new.flags.writeable and new.flags.c_contiguous
        assert not np.shares_memory(new, old)
        np.testing.assert_array_equal(new, old)


# --- pipelines from YAML specs ---------------------------------------------------------------


def test_pipeline_from_yaml_specs_is_deterministic_and_round_trips():
    specs = yaml.safe_load(
        """
        - {name: flip, p: 0.5}
        - {name: gaussian_noise, sigma: 0.05}
        - {name: elastic, p: 1.0, magnitude: [1, 3]}
        - {name: misalignment, p: 1.0, max_shift: 4, mode: slip}
        """
    )
    pipeline = build_pipeline(specs)
    assert [t.name for t in pipeline.transforms] == [
        "flip",
        "gaussian_noise",
        "elastic",
        "misalignment",
    ]
    assert pipeline.transforms[1].params.sigma == (0.05, 0.05)
    sample = read_only(membrane_sample(isotropic=False))
    assert same(pipeline(sample, 7), pipeline(sample, np.random.default_rng(7)))
    assert not same(pipeline(sample, 7), pipeline(sample, 8))
    shipped = pickle.loads(pickle.dumps(pipeline))  # as Ray ships it to workers
    assert same(shipped(sample, 7), pipeline(sample, 7))
    rebuilt = build_pipeline(yaml.safe_load(yaml.safe_dump(pipeline.specs())))
    assert rebuilt.specs() == pipeline.specs()
    assert same(rebuilt(sample, 7), pipeline(sample, 7))


@pytest.mark.parametrize("name", sorted(DEFAULT_PIPELINES))
def test_default_pipelines_build_and_run(name):
    pipeline = build_pipeline(name)
    assert isinstance(pipeline, Compose) and len(pipeline) == len(default_pipeline(name))
    sample = read_only(membrane_sample(isotropic=False))
    for seed in range(3):
        out = pipeline(sample, seed)
        assert out.image.shape == sample.image.shape and out.labels.shape == sample.labels.shape


@pytest.mark.parametrize(
    ("specs", "error", "words"),
    [
        ([{"name": "gaussian_nosie"}], RegistryError, ["#0", "did you mean 'gaussian_noise'"]),
        (
            [{"name": "flip"}, {"name": "gaussian_noise", "sigmaa": 0.1}],
            ConfigError,
            ["#1", "sigmaa", "'sigma'"],
        ),
        ([{"name": "flip", "p": 1.5}], ConfigError, ["'p'", "1.5"]),
        ([{"name": "gamma", "gamma": [2.0, 1.0]}], ConfigError, ["low <= high"]),
        ([{"name": "gamma", "gamma": 0.0}], ConfigError, ["positive"]),
        ([{"name": "gaussian_noise", "sigma": -0.1}], ConfigError, ["sigma", "negative"]),
        ([{"name": "cutout", "size": [0.5, 1.5]}], ConfigError, ["size", "within [0, 1]"]),
        ([{"name": "misalignment", "mode": "wobble"}], ConfigError, ["mode", "translation"]),
        ([{"p": 0.5}], ConfigError, ["needs a 'name'"]),
        (["flip"], ConfigError, ["mapping"]),
        ({"name": "flip"}, ConfigError, ["list"]),
        ("emm", ConfigError, ["did you mean 'em'"]),
    ],
)
def test_bad_specs_raise_errors_that_say_what_to_fix(specs, error, words):
    with pytest.raises(error) as info:
        build_pipeline(specs)
    for word in words:
        assert word in str(info.value)


# --- MS-Con weak / strong lists --------------------------------------------------------------


def test_mscon_config_has_explicit_weak_and_strong_lists():
    config = MSConAugmentConfig()
    strong = {spec["name"] for spec in config.strong}
    assert {
        "cutout",
        "gaussian_blur",
        "gaussian_noise",
        "missing_sections",
        "misalignment",
        "elastic",
    } <= strong
    assert not {"misalignment", "elastic", "cutout"} & {spec["name"] for spec in config.weak}
    assert from_json(MSConAugmentConfig, to_json(config)) == config

    custom = validate(MSConAugmentConfig, {"weak": [{"name": "brightness", "p": 1.0}]})
    assert custom.weak[0]["shift"] == [-0.1, 0.1]  # parameters spelled out on load
    with pytest.raises(ConfigError, match="strong.*did you mean 'cutout'"):
        validate(MSConAugmentConfig, {"strong": [{"name": "cutuot"}]})

    sample = read_only(membrane_sample(isotropic=False))
    clean, weak, strong_view = config.views(sample, np.random.default_rng(0))
    assert clean.image.shape == weak.image.shape == strong_view.image.shape
    assert not np.array_equal(weak.image, strong_view.image)
    assert float(np.abs(strong_view.image - clean.image).mean()) > float(
        np.abs(weak.image - clean.image).mean()
    )
