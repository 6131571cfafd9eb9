"""Offline 2D MAE on scikit-image's bundled photographs: data, loss, timm-loadable checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from neuroray.models.pretrain2d import (
    MAE2D,
    NATURAL_IMAGES,
    Pretrain2DJob,
    load_photo,
    pretrain_2d,
    random_masking,
)
from neuroray.models.transfer import encoder_from_2d

torch.set_num_threads(1)

TINY = dict(
    img_size=32,
    patch_size=8,
    width=32,
    depth=2,
    heads=2,
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=2,
    batch_size=8,
    lr=2e-3,
    warmup_steps=4,
    num_threads=1,
    progress=False,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit2d")
    return pretrain_2d(Pretrain2DJob(output=str(out), steps=40, **TINY))


@pytest.mark.parametrize("name", NATURAL_IMAGES)
def test_every_bundled_photo_loads_offline_as_rgb(name):
    image = load_photo(name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 128 and image.std() > 5  # a real photograph, not a blank


def test_loss_falls_below_the_predict_nothing_baseline(trained):
    losses = np.asarray(trained.losses)
    assert len(losses) == 40 and np.isfinite(losses).all()
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.9 * first
    # normalised pixel targets have unit variance per patch: predicting zeros scores ~1.0
    assert last < 0.97


def test_checkpoint_loads_with_timm_and_matches_the_saved_tensors(trained):
    meta = json.loads(trained.metadata.read_text())
    assert meta["model_name"] == trained.model_name and meta["model_args"]["embed_dim"] == 32
    model = timm.create_model(
        meta["model_name"],
        pretrained=False,
        checkpoint_path=str(trained.checkpoint),
        **meta["model_args"],
    )
    saved = load_file(str(trained.checkpoint))
    assert set(saved) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    plain = timm.models.VisionTransformer(**meta["model_args"])
    plain.load_state_dict(saved, strict=True)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 32)


def test_checkpoint_transfers_to_3d(trained):
    encoder, report = encoder_from_2d(trained.source, (4, 32, 32), (4, 8, 8), "center")
    assert report.config.dims() == (32, 2, 2)  # heads from the sidecar, not width // 64
    assert any("vit2d.json" in note for note in report.notes)
    saved = load_file(str(trained.checkpoint))
    assert torch.equal(
        encoder.state_dict()["blocks.1.mlp.fc2.weight"], saved["blocks.1.mlp.fc2.weight"]
    )
    assert encoder(torch.rand(2, 1, 4, 32, 32)).shape == (2, 16, 32)


def test_runs_are_reproducible(tmp_path):
    a = pretrain_2d(Pretrain2DJob(output=str(tmp_path / "a"), steps=3, **TINY))
    b = pretrain_2d(Pretrain2DJob(output=str(tmp_path / "b"), steps=3, **TINY))
    assert a.losses == b.losses


def test_masking_hides_the_configured_share_per_sample():
    kept, mask = random_masking(4, 16, 4, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [12] * 4
    assert not mask.gather(1, kept).any()
    model = MAE2D(Pretrain2DJob(**TINY))
    images = torch.rand(2, 3, 32, 32)
    patches = model.patchify(images)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(patches[0, 1].reshape(8, 8, 3), images[0, :, 0:8, 8:16].permute(1, 2, 0))


def test_config_rejects_unbundled_images_and_bad_shapes():
    with pytest.raises(ValueError, match="bundled"):
        Pretrain2DJob(images=("eagle",))  # in skimage's registry, but a pooch download
    with pytest.raises(ValueError, match="multiple"):
        Pretrain2DJob(img_size=60, patch_size=16)
