"""MaskingEnv, its rewards, the policy net and the weight store (dbMiM's pieces); the MIM oracle
the env asks is tested in test_oracle.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.utils.pre_checks.env import check_multiagent_environments

from neuroray.agents.env import (
    ArrayCrops,
    EmergentRewardSettings,
    EnvError,
    EnvSettings,
    MaskingEnv,
    RankRewardSettings,
    emergent_rewards,
    rank_centred,
    rank_rewards,
)
from neuroray.agents.oracle import MIMOracle
from neuroray.masking import AlphaSchedule, masked_count
from neuroray.models.mae import MAEConfig, build_mae3d, floored_patch_loss
from neuroray.models.policy import (
    ObsLayout,
    PatchPolicyNet,
    PolicyConfig,
    build_policy_net,
    patch_stats,
)
from neuroray.models.vit3d import ViTConfig
from neuroray.trainers.weights import WeightStore

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


K = masked_count(0.75, N)  # 24 of 32 patches masked in every crop


def make_env(oracle, volume, crops_per_episode=2, reward=None, alpha=0.5) -> MaskingEnv:
    settings = EnvSettings(
        crops_per_episode=crops_per_episode,
        reward=reward or RankRewardSettings(),
        alpha=AlphaSchedule(start=alpha, end=alpha),
    )
    return MaskingEnv(
        {"oracle": oracle, "crops": ArrayCrops(volume, CROP), "settings": settings, "seed": 3}
    )


# ---------------------------------------------------------------------- the env
def test_env_passes_rllib_multi_agent_checks_on_em(oracle, em_region):
    env = make_env(oracle, em_region, crops_per_episode=2)
    check_multiagent_environments(env)

    obs, infos = env.reset(seed=1)
    assert list(obs) == env.possible_agents == [f"{c}_{i}" for c in range(2) for i in range(N)]
    size = ObsLayout(WIDTH).size
    assert size == 2 * WIDTH + 6 and env.obs_dim == size
    for agent, value in obs.items():
        assert value.shape == (size,) and value.dtype == np.float32
        assert env.observation_spaces[agent].contains(value)
        assert env.action_spaces[agent].n == 2

    actions = {a: int(i % 3 == 0) for i, a in enumerate(env.possible_agents)}
    next_obs, rewards, terminated, truncated, infos = env.step(actions)
    assert set(rewards) == set(env.possible_agents)
    assert all(isinstance(r, float) and np.isfinite(r) for r in rewards.values())
    assert terminated["__all__"] and all(terminated[a] for a in env.possible_agents)
    assert not truncated["__all__"]
    assert set(next_obs) == set(env.possible_agents)  # the final observation of every agent
    for c in range(2):
        info = infos[f"{c}_0"]
        assert set(info) == {
            "team_loss",
            "mask_ratio",
            "chosen_ratio",
            "from_nominations",
            "nominee_rank",
            "alpha",
            "reward_mean",
            "mim_version",
        }
        mask = env.last["masks"][c]
        assert mask.sum() == K  # the fixed-count game: exactly K, whatever the agents chose
        assert info["mask_ratio"] == pytest.approx(mask.mean()) == pytest.approx(K / N)
        assert info["team_loss"] == pytest.approx(env.last["per_patch"][c][mask].mean(), rel=1e-5)
        assert (env.last["per_patch"][c][~mask] == 0).all()  # visible patches carry no loss


def test_patch_stats_known_answers():
    flat = torch.full((1, 1, *CROP), 0.3)
    stats = patch_stats(flat, PATCH)[0]
    np.testing.assert_allclose(stats[:, 0], 0.3, rtol=1e-6)
    np.testing.assert_allclose(stats[:, 1], np.log(1e-3), rtol=1e-4)
    np.testing.assert_allclose(stats[:, 2], np.log(1e-6), rtol=1e-4)

    slope = 0.01
    ramp = (torch.arange(CROP[2], dtype=torch.float32) * slope).expand(1, 1, *CROP)
    energy = np.exp(patch_stats(ramp, PATCH)[0, :, 2].numpy()) - 1e-6
    energy = energy.reshape(GRID)
    # every voxel has forward difference `slope` along x, except the crop's last x column (0)
    np.testing.assert_allclose(energy[..., :-1], slope**2, rtol=1e-4)
    np.testing.assert_allclose(energy[..., -1], slope**2 * 15 / 16, rtol=1e-4)


@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_fixed_count_game_masks_exactly_k_and_honours_round_alpha_k_nominations(
    oracle, em_region, share
):
    env = make_env(oracle, em_region, crops_per_episode=2, alpha=0.5)
    rng = np.random.default_rng(int(share * 100))
    chosen = round(0.5 * K)
    for _ in range(3):
        env.reset()
        actions = {a: int(rng.random() < share) for a in env.possible_agents}
        _, rewards, _, _, infos = env.step(actions)
        nominated = env.last["chosen"]
        masks, drawn = env.last["masks"], env.last["from_nominees"]
        assert (masks.sum(1) == K).all()  # the count never depends on the policy
        np.testing.assert_array_equal(drawn.sum(1), np.minimum(chosen, nominated.sum(1)))
        assert not (drawn & ~nominated).any() and not (drawn & ~masks).any()
        reward = np.array([rewards[a] for a in env.possible_agents]).reshape(2, N)
        np.testing.assert_allclose(reward.sum(1), 0, atol=1e-5)  # no incentive on the count
        assert (reward[~masks] == 0).all()  # visible patches get no credit either way
        for c in range(2):
            assert infos[f"{c}_0"]["alpha"] == 0.5
            assert infos[f"{c}_0"]["from_nominations"] == pytest.approx(drawn[c].sum() / K)


def test_alpha_follows_the_trainer_step_the_oracle_scored_with(oracle, em_region):
    settings = EnvSettings(crops_per_episode=1, alpha=AlphaSchedule(start=0.0, end=0.5))
    env = MaskingEnv(
        {
            "oracle": oracle,
            "crops": ArrayCrops(em_region, CROP),
            "settings": settings,
            "total_steps": 100,
        }
    )
    assert env.alpha == 0.0  # the oracle holds the initial weights (version 0)
    env.reset()
    _, _, _, _, infos = env.step(dict.fromkeys(env.possible_agents, 1))
    assert infos["0_0"]["alpha"] == 0.0 and not env.last["from_nominees"].any()
    env.mim_step = 50  # weights of trainer step 50 were scored last
    assert env.alpha == pytest.approx(0.25)


def test_emergent_game_fixes_up_all_keep_actions_and_rewards_the_scored_mask(oracle, em_region):
    env = make_env(oracle, em_region, crops_per_episode=1, reward=EmergentRewardSettings())
    env.reset(seed=0)
    _, rewards, _, _, infos = env.step(dict.fromkeys(env.possible_agents, 0))
    mask = env.last["masks"][0]
    assert mask.sum() == 1  # the MAE needs one masked patch: one agent is flipped
    assert infos["0_0"]["chosen_ratio"] == 0.0
    assert infos["0_0"]["mask_ratio"] == pytest.approx(1 / N)
    flipped = f"0_{int(np.flatnonzero(mask)[0])}"
    expected = emergent_rewards(
        env.last["per_patch"], mask[None], env.last["team"], env.settings.reward
    )
    assert rewards[flipped] == pytest.approx(float(expected[0, int(flipped[2:])]))


def test_bad_inputs_are_actionable_errors(oracle, em_region):
    with pytest.raises(EnvError, match="oracle"):
        MaskingEnv({"crops": ArrayCrops(em_region, CROP)})
    with pytest.raises(EnvError, match="crop source gives"):
        MaskingEnv({"oracle": oracle, "crops": ArrayCrops(em_region, (8, 32, 32))})
    env = make_env(oracle, em_region, crops_per_episode=1)
    with pytest.raises(EnvError, match="reset"):
        env.step({})
    env.reset()
    with pytest.raises(EnvError, match="missing"):
        env.step({"0_0": 1})


# ---------------------------------------------------------------------- rewards
def test_rank_reward_known_answers_sums_to_zero_and_ignores_the_loss_scale():
    per_patch = np.array([[0.9, 0.0, 0.3, 0.5, 0.0], [2.0, 2.0, 1.0, 0.0, 7.0]])
    masks = np.array([[True, False, True, True, False], [True, True, True, False, False]])
    ranks = rank_centred(per_patch, masks)
    # masked losses 0.9, 0.3, 0.5 rank 3, 1, 2 -> centred (r - 2) / 1; ties share their mean rank
    np.testing.assert_allclose(ranks, [[1, 0, -1, 0, 0], [0.5, 0.5, -1, 0, 0]])
    harder = rank_rewards(per_patch, masks, RankRewardSettings())
    np.testing.assert_allclose(harder, ranks)
    np.testing.assert_allclose(harder.sum(1), 0, atol=1e-6)
    easier = rank_rewards(per_patch, masks, RankRewardSettings(mode="easier"))
    np.testing.assert_allclose(easier, -harder)
    # robust to the loss drifting as the MIM model learns: any increasing map, same rewards
    np.testing.assert_allclose(
        rank_rewards(3 * per_patch**2 + 1, masks, RankRewardSettings()), harder
    )
    # a crop with one masked patch has no order: no reward
    assert (rank_centred(per_patch[:1], np.eye(5, dtype=bool)[:1]) == 0).all()


def test_rank_reward_sums_to_zero_on_random_crops():
    rng = np.random.default_rng(0)
    per_patch = rng.gamma(1.0, size=(200, 64))
    masks = rng.random((200, 64)) < rng.uniform(0.1, 0.9, (200, 1))
    rewards = rank_rewards(per_patch, masks, RankRewardSettings())
    np.testing.assert_allclose(rewards.sum(1), 0, atol=1e-5)
    assert np.abs(rewards).max() <= 1 and (rewards[~masks] == 0).all()


def test_emergent_rewards_known_answers_inside_the_band():
    per_patch = np.array([[0.5, 1.0, 0.0, 0.0]])
    masks = np.array([[True, True, False, False]])
    team = np.array([0.75])
    harder = emergent_rewards(
        per_patch, masks, team, EmergentRewardSettings(ratio_band=(0.4, 0.95))
    )
    np.testing.assert_allclose(harder, [[1.25, 1.75, 0.75, 0.75]])
    easier = emergent_rewards(
        per_patch, masks, team, EmergentRewardSettings(mode="easier", ratio_band=(0.4, 0.95))
    )
    np.testing.assert_allclose(easier, -harder)
    weighted = EmergentRewardSettings(team_weight=2.0, agent_weight=0.5, ratio_band=(0.4, 0.95))
    np.testing.assert_allclose(
        emergent_rewards(per_patch, masks, team, weighted), [[1.75, 2.0, 1.5, 1.5]]
    )


def test_emergent_band_term_charges_the_agents_that_moved_the_ratio_out():
    per_patch = np.zeros((1, 4))
    team = np.zeros(1)
    config = EmergentRewardSettings(ratio_band=(0.2, 0.5), ratio_weight=3.0)
    too_many = np.array([[True, True, True, False]])  # ratio 0.75 > 0.5: the maskers pay
    np.testing.assert_allclose(
        emergent_rewards(per_patch, too_many, team, config), [[-3, -3, -3, 0]]
    )
    # ratio 0 < 0.2: every keeper pays for the part of its 1/4 step outside the band (0.2 / 0.25)
    too_few = np.array([[False, False, False, False]])
    np.testing.assert_allclose(emergent_rewards(per_patch, too_few, team, config), [[-2.4] * 4])
    at_edge = np.array([[True, True, False, False]])  # ratio 0.5 is inside: no one pays
    np.testing.assert_allclose(emergent_rewards(per_patch, at_edge, team, config), [[0] * 4])


def test_reward_config_selects_the_game_by_kind_and_rejects_an_impossible_band():
    assert isinstance(EnvSettings().reward, RankRewardSettings) and EnvSettings().count == "fixed"
    emergent = EnvSettings.model_validate(
        {"reward": {"kind": "emergent", "ratio_band": [0.2, 0.8]}}
    )
    assert isinstance(emergent.reward, EmergentRewardSettings) and emergent.count == "emergent"
    with pytest.raises(ValueError, match="ratio_band"):
        EmergentRewardSettings(ratio_band=(0.9, 0.4))
    with pytest.raises(ValueError):  # the rank reward has no band: it does not reward the count
        EnvSettings.model_validate({"reward": {"kind": "rank", "ratio_band": [0.2, 0.8]}})


# ---------------------------------------------------------------------- reward target
def test_floored_target_stops_pure_noise_from_ranking_hardest():
    torch.manual_seed(0)
    model = build_mae3d(tiny_mae()).eval()
    rng = np.random.default_rng(0)
    crop = np.full((1, *CROP), 0.5, np.float32)
    crop += rng.normal(0, 0.01, crop.shape).astype(np.float32)  # faint noise (variance 1e-4)
    z, y, x = np.meshgrid(*(np.arange(s) for s in CROP), indexing="ij")
    stripes = 0.5 + 0.3 * np.sin(x / 2.0 + z)  # structure in the first two patches along x
    crop[0, :, :16, :32] = stripes[:, :16, :32]
    images = torch.from_numpy(crop)[:, None]
    mask = torch.ones(1, N, dtype=torch.bool)
    mask[0, -1] = False
    with torch.no_grad():
        out = model(images, mask)
    model_loss = out.per_patch_loss[0]
    floored = floored_patch_loss(model, images, out, 2e-3)[0]
    # with MAE's own eps as the floor the target is the normalised-pixel one the MAE trains on
    np.testing.assert_allclose(
        floored_patch_loss(model, images, out, 1e-6)[0], model_loss, rtol=1e-4, atol=1e-6
    )
    structured = [0, 1]  # tokens (0, 0, 0) and (0, 0, 1)
    noise = [i for i in range(8, 16)]  # z-slab 0, y rows 2-3: noise only
    # normalised pixels stretch noise to unit variance: an untrained model finds it as hard
    assert model_loss[noise].mean() > 0.5 * model_loss[structured].mean()
    # the floor scales a noise patch's loss by ~var / (var + floor) = 1e-4 / 2.1e-3
    assert floored[noise].max() < 0.1 * floored[structured].min()
    assert (floored[~mask[0]] == 0).all()


# ---------------------------------------------------------------------- policy net
def test_policy_starts_at_its_initial_mask_probability_and_checks_its_input():
    torch.manual_seed(0)
    net = build_policy_net(WIDTH, PolicyConfig(initial_mask_prob=0.8))
    obs = torch.randn(5, N, ObsLayout(WIDTH).size)
    probs = net.mask_probability(obs)
    assert probs.shape == (5, N)
    np.testing.assert_allclose(probs.numpy(), 0.8, atol=0.05)
    logits, value = net(obs)
    assert logits.shape == (5, N, 2) and value.shape == (5, N)
    with pytest.raises(Exception, match="feature_dim"):
        PatchPolicyNet(WIDTH + 1).mask_probability(obs)


# ---------------------------------------------------------------------- weights
def test_weight_store_keeps_the_newest_version_per_channel():
    store = WeightStore()
    assert store.version("mim") == -1 and store.get("mim") is None
    assert store.put("mim", 5, {"a": 1})
    assert not store.put("mim", 3, {"a": 0})  # an older publication never replaces a newer one
    assert store.get("mim") == (5, {"a": 1})
    assert store.get("mim", newer_than=5) is None
    store.put("policy", 1, {"b": 2})
    assert store.versions() == {"mim": 5, "policy": 1}
