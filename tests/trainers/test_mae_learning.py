"""MAE-3D learns on real EM: masked loss falls below its start and below the trivial predictor.

Budget (stated, as the issue asks): a tiny ViT (width 128, depth 4) trained in-process for
2,500 steps of 8 random 16×64×64 crops of fib_medulla_s1_raw, lr 3e-4; about 3 minutes on
2 CPU cores. On this data the loss sits on the trivial plateau (~1.0: predicting each hidden
patch's mean) for ~1,000 steps before it starts to fall (measured: 0.88 at 2,900 steps).

It needs the real cube (it skips naming it without ../shared): on the synthetic EM cube (the
em_raw fixture's stand-in, 64 x 128 x 128) the same model and settings stay on the plateau (0.999
against a trivial 0.999 after 1,200 steps, measured), and smaller models, patches, higher
learning rates or fixed crops did not leave it within a few hundred steps either: synth_em's
noise and texture are ~40% of each patch's variance (~13% on the FIB-SEM cube).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroray.masking import RandomMasker
from neuroray.models.mae import MAEConfig, build_mae3d, per_patch_mean_loss
from neuroray.platform.volume import open_volume

STEPS, BATCH, CROP = 2500, 8, (16, 64, 64)


@pytest.mark.timeout(2400)  # ~3 min alone; measured 6x slower with two training jobs beside it
def test_masked_loss_falls_below_start_and_trivial_baseline(real_data):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    source = real_data("em/fib_medulla_s1_raw.h5")
    volume = open_volume(f"{source}#raw")[:].astype(np.float32) / 255
    config = MAEConfig.model_validate({
        "encoder": {"size": None, "width": 128, "depth": 4, "heads": 4, "img_size": list(CROP)},
        "decoder_width": 128, "decoder_depth": 2, "decoder_heads": 4, "norm_pix_loss": True,
    })
    model = build_mae3d(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    rng = np.random.default_rng(0)
    masker = RandomMasker(ratio=0.75)
    grid = (BATCH, *(c // p for c, p in zip(CROP, (4, 16, 16), strict=True)))
    losses, baselines = [], []
    for _ in range(STEPS):
        starts = rng.integers(0, np.asarray(volume.shape) - CROP, size=(BATCH, 3), endpoint=True)
        crops = np.stack([volume[z : z + 16, y : y + 64, x : x + 64] for z, y, x in starts])
        x = torch.from_numpy(crops[:, None])
        mask = torch.from_numpy(masker.mask(grid, rng))
        out = model(x, mask)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        losses.append(out.loss.item())
        baselines.append(per_patch_mean_loss(x, mask, (4, 16, 16)).item())
    start, end = np.mean(losses[:20]), np.mean(losses[-200:])
    trivial = np.mean(baselines[-200:])
    assert end < start - 0.15, (start, end)
    assert end < trivial - 0.03, (end, trivial)  # it predicts structure, not just patch means
