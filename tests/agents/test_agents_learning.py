"""PPO on the masking game learns a known optimum (RLlib, new API stack, one shared policy).

The oracle here scores with a rule whose optimum is known instead of an MAE: a patch is hard to
reconstruct (loss 1) exactly when it is textured (voxel std above a threshold) and free (loss 0)
when it is flat. Crops are made of whole patches, half of them textured at random. With the
default harder-is-better reward the best policy masks the textured patches and keeps the flat
ones; with easier-is-better, the reverse (the ratio band [0.4, 0.95] makes it mask something).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroray.agents.config import PPOSettings, RLSettings
from neuroray.agents.env import EnvSettings, RewardSettings
from neuroray.agents.oracle import MIMOracle, team_losses
from neuroray.agents.ppo import build_ppo_config
from neuroray.models.mae import MAEConfig
from neuroray.models.policy import PolicyConfig
from neuroray.models.vit3d import ViTConfig, patchify

CROP, PATCH = (8, 64, 64), (4, 16, 16)
GRID = (2, 4, 4)
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


class TexturedIsHardOracle(MIMOracle):
    """Observes like the MIM oracle (current encoder features, stats); scores by a known rule."""

    def score(self, crops: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        masks = np.asarray(masks).reshape(len(crops), -1)
        per_patch = np.where(masks, textured(np.asarray(crops)).astype(np.float64), 0.0)
        return {
            "per_patch": per_patch,
            "team": team_losses(per_patch, masks),
            "version": np.int64(self.version),
        }


@pytest.mark.parametrize("mode", ["harder", "easier"])
def test_ppo_learns_to_mask_the_patches_the_oracle_finds_hard(ray_session, mode):
    torch.set_num_threads(1)
    model = MAEConfig(
        encoder=ViTConfig(
            size=None, width=WIDTH, depth=1, heads=2, patch_size=PATCH, img_size=CROP
        ),
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=2,
    )
    oracle = TexturedIsHardOracle(model, seed=0)
    rl = RLSettings(
        env=EnvSettings(crops_per_episode=8, reward=RewardSettings(mode=mode)),
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
        net = algo.get_module("shared").net
        before = net.mask_probability(obs).numpy()
        assert abs(before[hard].mean() - before[~hard].mean()) < 0.1  # no preference at start

        for _ in range(14):
            result = algo.train()
        after = algo.get_module("shared").net.mask_probability(obs).numpy()
    finally:
        algo.stop()

    p_hard, p_easy = after[hard].mean(), after[~hard].mean()
    if mode == "harder":
        assert p_hard > 0.9 and p_hard - p_easy > 0.4, (p_hard, p_easy)
    else:
        assert p_easy > 0.9 and p_easy - p_hard > 0.4, (p_hard, p_easy)
    runners = result["env_runners"]
    assert 0.4 <= runners["mask_ratio"] <= 0.95  # the emergent ratio settled inside the band
    assert result["learners"]["shared"]["entropy"] < 0.6  # sharper than a coin flip (0.69)
