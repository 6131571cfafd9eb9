"""The MIM oracle (agents/oracle.py): what it answers for batches of crops and masks, and the
checks on what it is handed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroray.agents.oracle import MIMOracle, OracleError, as_images, team_losses
from neuroray.models.mae import MAEConfig, build_mae3d
from neuroray.models.policy import ObsLayout
from neuroray.models.vit3d import ViTConfig
from neuroray.platform.volume import open_volume
from neuroray.trainers.weights import state_dict_to_numpy

CROP, PATCH = (8, 64, 64), (4, 16, 16)
GRID = (2, 4, 4)
N = 32
WIDTH = 32


def tiny_mae() -> MAEConfig:
    encoder = ViTConfig(size=None, width=WIDTH, depth=1, heads=2, patch_size=PATCH, img_size=CROP)
    return MAEConfig(encoder=encoder, decoder_width=32, decoder_depth=1, decoder_heads=2)


@pytest.fixture(scope="module")
def oracle() -> MIMOracle:
    torch.set_num_threads(1)
    return MIMOracle(tiny_mae(), seed=0)


@pytest.fixture(scope="module")
def crops(em_raw) -> np.ndarray:
    """Three FIB-SEM crops (synthetic EM without ../shared), float in [0, 1]."""
    volume = open_volume(em_raw.raw)
    region = np.asarray(volume[0:8, 0:128, 0:128], np.float32) / 255  # inside every stand-in
    return np.stack([region[:, y : y + 64, x : x + 64] for y, x in ((0, 0), (0, 64), (64, 32))])


def every_other(batch: int, offset: int = 0) -> np.ndarray:
    masks = np.zeros((batch, N), bool)
    masks[:, offset::2] = True
    return masks


def test_team_loss_is_the_mean_over_masked_patches():
    per_patch = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 0.0, 0.0]])
    masks = np.array([[True, False, True, False], [False, False, False, False]])
    np.testing.assert_allclose(team_losses(per_patch, masks), [2.0, 0.0])  # none masked: 0
    grid = masks.reshape(2, 1, 2, 2)  # masks on the token grid count the same
    np.testing.assert_allclose(team_losses(per_patch, grid), [2.0, 0.0])


def test_crops_become_one_channel_float_images_or_are_refused():
    images = as_images(np.zeros((2, *CROP), np.float64))
    assert images.shape == (2, 1, *CROP) and images.dtype == torch.float32
    assert as_images(torch.zeros(2, 1, *CROP)).shape == (2, 1, *CROP)
    with pytest.raises(OracleError, match="float"):
        as_images(np.zeros((2, *CROP), np.uint8))
    with pytest.raises(OracleError, match=r"\[B, Z, Y, X\]"):
        as_images(np.zeros((2, 2, *CROP), np.float32))


def test_the_oracle_describes_the_spaces_of_its_model(oracle):
    assert oracle.describe() == {
        "grid": GRID,
        "feature_dim": WIDTH,
        "obs_dim": ObsLayout(WIDTH).size,
        "crop_shape": CROP,
        "patch_size": PATCH,
        "version": 0,
    }
    assert oracle.refresh() == 0  # no weight store: it keeps what it holds


def test_scores_are_per_masked_patch_with_the_team_loss_and_the_version(oracle, crops):
    masks = every_other(3)
    before = oracle.crops_scored
    scored = oracle.score(crops, masks)
    per_patch, team = scored["per_patch"], scored["team"]
    assert per_patch.shape == (3, N) and team.shape == (3,) and int(scored["version"]) == 0
    assert (per_patch[~masks] == 0).all() and (per_patch[masks] > 0).all()
    np.testing.assert_allclose(team, per_patch[masks].reshape(3, -1).mean(1), rtol=1e-6)
    assert oracle.crops_scored == before + 3
    # masks on the token grid mean the same; the same crops and masks score the same
    again = oracle.score(crops, masks.reshape(3, *GRID))
    np.testing.assert_array_equal(again["per_patch"], per_patch)


def test_a_batch_scores_as_its_crops_one_by_one(oracle, crops):
    masks = np.concatenate([every_other(2), every_other(1, offset=1)])
    batch = oracle.score(crops, masks)["per_patch"]
    for i in range(3):
        alone = oracle.score(crops[i : i + 1], masks[i : i + 1])["per_patch"][0]
        np.testing.assert_allclose(alone, batch[i], rtol=1e-4, atol=1e-6)


def test_published_weights_replace_the_initial_ones(crops):
    oracle = MIMOracle(tiny_mae(), seed=0)
    masks = every_other(3)
    initial = oracle.score(crops, masks)["per_patch"]
    torch.manual_seed(1)
    newer = build_mae3d(tiny_mae())
    oracle.set_weights(state_dict_to_numpy(newer.state_dict()), version=7)  # as the store holds
    assert oracle.version == 7 and oracle.describe()["version"] == 7
    for key, value in newer.state_dict().items():
        assert torch.equal(oracle.model.state_dict()[key], value)
    scored = oracle.score(crops, masks)
    assert int(scored["version"]) == 7 and not np.allclose(scored["per_patch"], initial)
    assert not oracle.model.training  # still in eval mode


def test_the_same_seed_gives_the_trainers_initial_weights():
    torch.manual_seed(0)  # run_worker seeds like this before it builds the model
    trainer = build_mae3d(tiny_mae())
    oracle = MIMOracle(tiny_mae(), seed=0)
    for key, value in trainer.state_dict().items():
        assert torch.equal(oracle.model.state_dict()[key], value)
    other = MIMOracle(tiny_mae().model_dump_json(), seed=1)  # the config also as JSON
    assert not torch.equal(
        other.model.state_dict()["encoder.patch_embed.proj.weight"],
        trainer.state_dict()["encoder.patch_embed.proj.weight"],
    )
