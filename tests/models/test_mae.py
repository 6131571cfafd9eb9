"""MAE-3D: masked-only losses, per-patch normalised targets, HOG = scikit-image's HOG, bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.feature import hog as skimage_hog

from neuroray.config import validate
from neuroray.errors import ConfigError
from neuroray.masking import RandomMasker
from neuroray.models.hog import HOGConfig, hog_2d, patch_hog, patch_hog_size
from neuroray.models.mae import (
    MAE3D,
    MAEConfig,
    build_mae3d,
    masked_mse,
    per_patch_mean_loss,
)
from neuroray.models.vit3d import ModelError, patchify
from neuroray.platform.volume import open_volume

torch.set_num_threads(1)
CROP, PATCH, GRID = (8, 64, 64), (4, 16, 16), (2, 4, 4)


def tiny_mae(**kwargs) -> MAE3D:
    torch.manual_seed(0)
    options = dict(
        encoder=dict(size=None, width=64, depth=4, heads=4, img_size=CROP, patch_size=PATCH),
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=4,
    )
    options.update(kwargs)
    return build_mae3d(validate(MAEConfig, options))


def random_mask(batch: int, ratio: float = 0.75, seed: int = 0) -> np.ndarray:
    return RandomMasker(ratio=ratio).mask((batch, *GRID), np.random.default_rng(seed))


def test_masked_mse_ignores_visible_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 10, 6), torch.randn(2, 10, 6)
    mask = torch.rand(2, 10) < 0.6
    mask[:, 0], mask[:, 1] = True, False
    mean, per_patch = masked_mse(pred, target, mask)
    changed = torch.where(mask[..., None], pred, pred + 100 * torch.randn_like(pred))
    assert torch.equal(masked_mse(changed, target, mask)[0], mean)
    assert (per_patch[~mask] == 0).all() and (per_patch[mask] > 0).all()
    torch.testing.assert_close(mean, ((pred - target) ** 2).mean(-1)[mask].mean())


def test_model_loss_has_no_gradient_on_visible_predictions():
    model = tiny_mae(hog_weight=0.5)
    x = torch.randn(2, 1, *CROP)
    mask = random_mask(2)
    out = model(x, mask)
    out.pred.retain_grad()
    out.pred_hog.retain_grad()
    out.loss.backward()
    visible = ~out.mask
    assert (out.pred.grad[visible] == 0).all() and (out.pred_hog.grad[visible] == 0).all()
    assert out.pred.grad[out.mask].abs().sum(-1).gt(0).all()
    assert (out.per_patch_loss[visible] == 0).all() and (out.per_patch_loss[out.mask] > 0).all()
    assert not out.per_patch_loss.requires_grad
    # the scalar loss is the weighted mean of the per-patch losses over masked patches
    torch.testing.assert_close(out.loss, out.per_patch_loss[out.mask].mean())
    torch.testing.assert_close(out.loss, out.losses["pix"] + 0.5 * out.losses["hog"])
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_norm_pix_targets_have_zero_mean_unit_variance_per_patch():
    x = torch.rand(2, 1, *CROP) * 50 + 100
    target, _ = tiny_mae().targets(x)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 32), atol=1e-4, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.ones(2, 32), atol=1e-3, rtol=0)
    raw, _ = tiny_mae(norm_pix_loss=False).targets(x)
    assert torch.equal(raw, patchify(x, PATCH))


def test_per_patch_mean_predictor_scores_one_on_normalised_targets():
    x = torch.randn(2, 1, *CROP)
    mask = random_mask(2)
    assert abs(float(per_patch_mean_loss(x, mask, PATCH)) - (1 - 1 / 1024)) < 1e-3


def test_unequal_mask_counts_per_sample():
    model = tiny_mae()
    mask = random_mask(2)
    mask[1] = random_mask(1, ratio=0.5, seed=3)[0]
    out = model(torch.randn(2, 1, *CROP), mask)
    assert out.mask.sum(1).tolist() == [24, 16]
    assert torch.isfinite(out.loss) and (out.per_patch_loss[~out.mask] == 0).all()


def test_visible_voxels_do_not_leak_masked_voxels_into_the_encoder():
    """Changing hidden voxels changes the targets but not the prediction."""
    model = tiny_mae().eval()
    x = torch.randn(1, 1, *CROP)
    mask = random_mask(1)
    hidden = torch.from_numpy(mask).reshape(1, -1)[..., None].expand(-1, -1, 1024).float()
    hidden = model.encoder.unpatchify(hidden).bool()
    changed = torch.where(hidden, torch.randn_like(x), x)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask).pred, model(changed, mask).pred)


def test_reconstruct_keeps_visible_voxels_and_fills_masked_ones():
    model = tiny_mae()
    x = torch.rand(2, 1, *CROP)
    mask = random_mask(2)
    for stats in ("visible", "patch"):
        recon = model.reconstruct(x, mask, stats=stats)
        assert recon.shape == x.shape and recon.dtype == torch.float32
        hidden = model.encoder.unpatchify(
            torch.from_numpy(mask).reshape(2, -1)[..., None].expand(-1, -1, 1024).float()
        ).bool()
        assert torch.equal(recon[~hidden], x[~hidden])
        assert not torch.allclose(recon[hidden], x[hidden])
    with pytest.raises(ModelError, match="stats"):
        model.reconstruct(x, mask, stats="oracle")


def test_bad_masks_are_actionable_errors():
    model = tiny_mae()
    x = torch.randn(1, 1, *CROP)
    with pytest.raises(ModelError, match="bool"):
        model(x, np.zeros((1, 2, 2, 2), dtype=bool))
    with pytest.raises(ModelError, match="at least one masked and one visible"):
        model(x, np.ones((1, *GRID), dtype=bool))


def test_bf16_autocast_forward_is_finite_and_close_to_fp32():
    model = tiny_mae(hog_weight=1.0)
    x = torch.randn(2, 1, *CROP)
    mask = random_mask(2)
    full = model(x, mask)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        half = model(x, mask)
    assert half.pred.dtype == torch.bfloat16 and half.loss.dtype == torch.float32
    assert (
        torch.isfinite(half.loss)
        and abs(half.loss.item() - full.loss.item()) < 0.05 * full.loss.item()
    )
    half.loss.backward()
    assert torch.isfinite(model.encoder.blocks[0].attn.qkv.weight.grad).all()


def test_a_few_steps_learn_to_fill_in_smooth_structure():
    """On smooth waves the hidden patches are predictable: 30 AdamW steps beat the per-patch mean."""
    model = tiny_mae()
    z, y, x = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in CROP), indexing="ij")
    volume = torch.stack(
        [torch.sin(y / 5 + 2 * b) + torch.cos(x / 7 + b) + 0.3 * torch.sin(z) for b in range(2)]
    )[:, None]
    mask = random_mask(2)
    baseline = float(per_patch_mean_loss(volume, mask, PATCH))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(volume, mask)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0] and losses[-1] < 0.7 * baseline


def test_state_dict_keeps_the_encoder_under_its_prefix():
    keys = tiny_mae(hog_weight=1.0).state_dict().keys()
    for key in (
        "encoder.patch_embed.proj.weight",
        "encoder.pos_embed",
        "encoder.blocks.3.mlp.fc2.weight",
        "encoder.norm.weight",
        "mask_token",
        "decoder_pos_embed",
        "decoder_pred.weight",
        "decoder_pred_hog.weight",
    ):
        assert key in keys


def test_config_rejects_impossible_settings():
    with pytest.raises(ConfigError, match="too small"):
        validate(
            MAEConfig,
            {"hog_weight": 1.0, "encoder": {"patch_size": [4, 8, 8], "img_size": [8, 32, 32]}},
        )
    with pytest.raises(ConfigError, match="nothing would be learned"):
        validate(MAEConfig, {"pix_weight": 0})
    with pytest.raises(ConfigError, match="decoder_width"):
        validate(MAEConfig, {"decoder_width": 100, "decoder_heads": 16})


# -- HOG ------------------------------------------------------------------------------------------


def skimage_patch_hog(volume: np.ndarray, cfg: HOGConfig) -> np.ndarray:
    """Reference: skimage.feature.hog on each z-slice of each patch, z-major tokens."""
    pz, py, px = PATCH
    rows = []
    for z in range(0, volume.shape[0], pz):
        for y in range(0, volume.shape[1], py):
            for x in range(0, volume.shape[2], px):
                patch = volume[z : z + pz, y : y + py, x : x + px]
                rows.append(
                    np.concatenate(
                        [
                            skimage_hog(
                                s,
                                orientations=cfg.orientations,
                                pixels_per_cell=cfg.pixels_per_cell,
                                cells_per_block=cfg.cells_per_block,
                                block_norm=cfg.block_norm,
                            )
                            for s in patch
                        ]
                    )
                )
    return np.stack(rows)


@pytest.mark.parametrize("block_norm", ["L1", "L1-sqrt", "L2", "L2-Hys"])
@pytest.mark.parametrize("cells_per_block,orientations", [((2, 2), 9), ((1, 1), 12)])
def test_hog_matches_scikit_image_on_a_known_image(block_norm, cells_per_block, orientations):
    camera = skdata.camera()  # ships with scikit-image
    image = camera[200:216, 240:272]
    cfg = HOGConfig(
        orientations=orientations, cells_per_block=cells_per_block, block_norm=block_norm
    )
    reference = skimage_hog(
        image,
        orientations=orientations,
        pixels_per_cell=(8, 8),
        cells_per_block=cells_per_block,
        block_norm=block_norm,
    )
    ours = hog_2d(
        torch.from_numpy(image.astype(np.float32)),
        orientations,
        (8, 8),
        cells_per_block,
        block_norm,
    )
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-6)
    # per patch and z-slice on a small stack of camera crops
    volume = np.stack([camera[100 + 3 * i : 132 + 3 * i, 300:332] for i in range(4)])
    ours = patch_hog(torch.from_numpy(volume.astype(np.float32))[None, None], PATCH, cfg)[0]
    np.testing.assert_allclose(ours.numpy(), skimage_patch_hog(volume, cfg), atol=1e-6)
    assert ours.shape[-1] == patch_hog_size(PATCH, 1, cfg)


def test_hog_matches_scikit_image_on_em(em_raw):
    """On FIB-SEM (fib_medulla_s1_raw) where the data is, on the synthetic EM cube otherwise."""
    z = 100 if em_raw.real else 32  # the synthetic cube has 64 sections
    volume = open_volume(em_raw.raw)[z : z + 8, 64:128, 64:128]
    cfg = HOGConfig()
    ours = patch_hog(torch.from_numpy(volume.astype(np.float32))[None, None], PATCH, cfg)[0]
    np.testing.assert_allclose(ours.numpy(), skimage_patch_hog(volume, cfg), atol=1e-6)
    assert ours.shape == (32, 4 * 36)
