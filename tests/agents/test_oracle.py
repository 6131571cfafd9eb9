"""The MIM oracle (agents/oracle.py): the observations and scores it answers for batches of
crops and masks, the checks on what it is handed, and the oracle as a Ray actor following the
weights the trainer publishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.utils.pre_checks.env import check_multiagent_environments

from neuroray.agents.env import ArrayCrops, EnvSettings, MaskingEnv
from neuroray.agents.oracle import (
    MIMOracle,
    OracleError,
    OracleSettings,
    as_images,
    start_oracle,
    team_losses,
)
from neuroray.models.mae import MAEConfig, build_mae3d
from neuroray.models.policy import ObsLayout, token_positions
from neuroray.models.vit3d import ViTConfig, patchify
from neuroray.trainers.weights import start_weight_store, state_dict_to_numpy

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
def crops(em_region) -> np.ndarray:
    """Three FIB-SEM crops (synthetic EM without ../shared), float in [0, 1]."""
    return ArrayCrops(em_region, CROP).sample(3, np.random.default_rng(1))


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


def test_observations_follow_the_documented_layout(oracle, em_region):
    crops = ArrayCrops(em_region, CROP).sample(3, np.random.default_rng(0))
    obs = oracle.observe(crops)
    layout = ObsLayout(WIDTH)
    assert obs.shape == (3, N, layout.size)

    features = obs[..., layout.feature]
    model = build_mae3d(tiny_mae())
    model.load_state_dict(oracle.model.state_dict())
    images = torch.from_numpy(crops)[:, None]
    expected = model.encoder.patch_embed(images).detach().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    context = obs[..., layout.context]
    np.testing.assert_allclose(context, features.mean(1, keepdims=True).repeat(N, 1), atol=1e-5)

    position = obs[..., layout.position]
    assert (position > 0).all() and (position < 1).all()
    np.testing.assert_allclose(position[0], token_positions(GRID).numpy())
    assert position[0, 1].tolist() == pytest.approx([0.25, 0.125, 0.375])  # token (0, 0, 1)

    patches = patchify(images, PATCH).numpy()
    stats = obs[..., layout.stats]
    np.testing.assert_allclose(stats[..., 0], patches.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(stats[..., 1], np.log(patches.std(-1) + 1e-3), rtol=1e-4)


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


def test_crops_and_masks_that_do_not_fit_the_model_are_refused(oracle):
    with pytest.raises(OracleError, match="bool"):
        oracle.score(np.zeros((1, *CROP), np.float32), np.zeros((1, N), np.int64))
    with pytest.raises(OracleError, match="img_size"):
        oracle.observe(np.zeros((1, 8, 32, 32), np.float32))


# ---------------------------------------------------------------------- as a Ray actor
def test_oracle_actor_matches_the_trainer_init_and_follows_published_weights(
    ray_session, em_region
):
    store = start_weight_store()
    actor = start_oracle(tiny_mae(), OracleSettings(), seed=0, store=store)
    local = MIMOracle(tiny_mae(), seed=0)
    crops = ArrayCrops(em_region, CROP).sample(2, np.random.default_rng(5))
    # before any publication the oracle holds the trainer's initial weights (same seed)
    np.testing.assert_allclose(ray_session.get(actor.observe.remote(crops)), local.observe(crops))

    torch.manual_seed(1)
    newer = build_mae3d(tiny_mae())
    payload = {"state_dict": state_dict_to_numpy(newer.state_dict()), "step": 7}
    ray_session.get(store.put.remote("mim", 7, payload))
    obs = ray_session.get(actor.observe.remote(crops))
    assert ray_session.get(actor.describe.remote())["version"] == 7
    local.set_weights(newer.state_dict(), 7)
    np.testing.assert_allclose(obs, local.observe(crops), rtol=1e-5, atol=1e-6)

    masks = np.zeros((2, N), bool)
    masks[:, ::2] = True
    scored = ray_session.get(actor.score.remote(crops, masks))
    assert scored["per_patch"].shape == (2, N) and scored["team"].shape == (2,)
    assert int(scored["version"]) == 7

    env = MaskingEnv(
        {
            "oracle": actor,
            "crops": ArrayCrops(em_region, CROP),
            "settings": EnvSettings(crops_per_episode=2),
        }
    )
    check_multiagent_environments(env)
    ray_session.kill(actor)
    ray_session.kill(store)
