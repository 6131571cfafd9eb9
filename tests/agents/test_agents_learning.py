"""PPO on the masking game learns *where* to mask (RLlib, new API stack, one shared policy).

The oracle here scores with a known rule instead of an MAE: a masked patch costs ``1 + 0.2`` when
it is textured (voxel std above a threshold) and ``1`` when it is flat. Crops are made of whole
patches, half of them textured at random. Every patch costs about 1, so masking pays for every
patch under a reward that grows with the patch's own loss: this oracle exposes a policy that
learns "mask more" instead of "where".

- The default game (fixed count K, rank-centred reward): the nomination probability rises on
  textured patches and falls on flat ones ("harder"; the reverse for "easier"), while every crop
  masks exactly K patches.
- The emergent game (the original reward, kept as a named option): the policy learns to mask
  more, and the ratio runs up to the band's ceiling, the collapse its docstring describes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroray.agents.config import PPOSettings, RLSettings
from neuroray.agents.env import EmergentRewardSettings, EnvSettings, RankRewardSettings
from neuroray.agents.oracle import MIMOracle, team_losses
from neuroray.agents.ppo import build_ppo_config
from neuroray.masking import AlphaSchedule, masked_count
from neuroray.models.mae import MAEConfig
from neuroray.models.policy import PolicyConfig
from neuroray.models.vit3d import ViTConfig, patchify

CROP, PATCH = (8, 64, 64), (4, 16, 16)
GRID = (2, 4, 4)
N = 32
K = masked_count(0.75, N)  # 24
WIDTH = 32
TEXTURE_STD = 0.2


class PatchKindCrops:
    """Crops tiled by whole patches: each flat (one grey level) or textured (plus noise)."""

    crop_shape = CROP

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        textured = rng.random((n, *GRID)) < 0.5
        grey = np.kron(rng.uniform(0.2, 0.8, (n, *GRID)), np.ones(PATCH))
        noise = rng.normal(0, TEXTURE_STD, (n, *CROP)) * np.kron(textured, np.ones(PATCH))
        return (grey + noise).astype(np.float32)


def textured(crops: np.ndarray) -> np.ndarray:
    return patchify(torch.from_numpy(crops)[:, None], PATCH).std(-1).numpy() > TEXTURE_STD / 4


SCORED_COUNTS: list[np.ndarray] = []
"""Masked patches per crop of every mask the oracles scored (RLlib copies the env's oracle)."""


class TexturedIsHarderOracle(MIMOracle):
    """Observes like the MIM oracle (current encoder features, stats); scores masked patches by
    ``1 + 0.2 * textured`` and records each crop's masked count in ``SCORED_COUNTS``."""

    def score(self, crops: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        masks = np.asarray(masks).reshape(len(crops), -1)
        SCORED_COUNTS.append(masks.sum(1))
        loss = 1.0 + 0.2 * textured(np.asarray(crops))
        per_patch = np.where(masks, loss, 0.0)
        return {
            "per_patch": per_patch,
            "team": team_losses(per_patch, masks),
            "version": np.int64(self.version),
        }


def tiny_mae() -> MAEConfig:
    encoder = ViTConfig(size=None, width=WIDTH, depth=1, heads=2, patch_size=PATCH, img_size=CROP)
    return MAEConfig(encoder=encoder, decoder_width=32, decoder_depth=1, decoder_heads=2)


def train(env: EnvSettings, iterations: int) -> tuple[float, float, dict]:
    """PPO on the game; returns the final probability of action 1 on textured and on flat
    patches of 64 probe crops, and the last result."""
    torch.set_num_threads(1)
    SCORED_COUNTS.clear()
    oracle = TexturedIsHarderOracle(tiny_mae(), seed=0)
    rl = RLSettings(
        env=env,
        policy=PolicyConfig(initial_mask_prob=0.5),
        ppo=PPOSettings(train_batch_agent_steps=1024, minibatch_size=256, num_epochs=4, lr=1e-3),
        seed=0,
    )
    env_config = {"oracle": oracle, "crops": PatchKindCrops(), "settings": rl.env, "seed": 0}
    algo = build_ppo_config(rl, env_config, WIDTH).build_algo()
    try:
        crops = PatchKindCrops().sample(64, np.random.default_rng(123))
        hard = textured(crops)
        obs = torch.from_numpy(oracle.observe(crops))
        before = algo.get_module("shared").net.mask_probability(obs).numpy()
        assert abs(before[hard].mean() - before[~hard].mean()) < 0.1  # no preference at start
        for _ in range(iterations):
            result = algo.train()
        after = algo.get_module("shared").net.mask_probability(obs).numpy()
    finally:
        algo.stop()
    return float(after[hard].mean()), float(after[~hard].mean()), result


@pytest.mark.parametrize("mode", ["harder", "easier"])
def test_fixed_count_game_learns_where_and_masks_exactly_k(ray_session, mode):
    # alpha held at 0.5 (the schedule's end): half of each crop's K from the nominees
    env = EnvSettings(
        crops_per_episode=8,
        reward=RankRewardSettings(mode=mode),
        alpha=AlphaSchedule(start=0.5, end=0.5),
    )
    p_textured, p_flat, result = train(env, iterations=14)
    print(f"{mode}: nomination probability textured {p_textured:.3f}, flat {p_flat:.3f}")
    if mode == "harder":
        assert p_textured - p_flat > 0.3, (p_textured, p_flat)
    else:
        assert p_flat - p_textured > 0.3, (p_textured, p_flat)
    counts = np.concatenate(SCORED_COUNTS)
    assert len(counts) >= 14 * 1024 // N and (counts == K).all()  # every crop: exactly K
    runners = result["env_runners"]
    assert runners["mask_ratio"] == pytest.approx(K / N)
    # the masked nominees rank harder (easier) than the crop's average masked patch
    sign = 1 if mode == "harder" else -1
    assert sign * runners["nominee_rank"] > 0.1, runners["nominee_rank"]
    assert abs(runners["reward_mean"]) < 1e-6  # the reward sums to zero over every crop


def test_emergent_game_collapses_to_masking_more(ray_session):
    # the original reward: every patch's own loss (~1) pays for masking it, textured or not
    env = EnvSettings(crops_per_episode=8, reward=EmergentRewardSettings(ratio_band=(0.4, 0.95)))
    p_textured, p_flat, result = train(env, iterations=8)
    print(f"emergent: mask probability textured {p_textured:.3f}, flat {p_flat:.3f}")
    assert p_flat > 0.75 and p_textured > 0.75  # "mask more", flat patches included
    assert result["env_runners"]["mask_ratio"] > 0.75  # on its way to the band's ceiling
