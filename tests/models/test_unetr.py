"""UNETR: anisotropic upsampling, skips on/off, gradients, bf16, encoder loading, lr decay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroray.config import validate
from neuroray.masking import RandomMasker
from neuroray.models.mae import MAEConfig, build_mae3d
from neuroray.models.unetr import (
    UNETR,
    UNETRConfig,
    build_unetr,
    freeze_encoder,
    load_encoder,
    param_groups_lrd,
    upsample_schedule,
)
from neuroray.models.vit3d import ModelError, ViT3D, resize_pos_embed

torch.set_num_threads(1)


def tiny_unetr(patch=(4, 16, 16), crop=(8, 32, 32), **kwargs) -> UNETR:
    torch.manual_seed(0)
    encoder = ViT3D(
        img_size=crop, patch_size=patch, embed_dim=32, depth=4, num_heads=4, pos_embed="learned"
    )
    return UNETR(encoder, feature_size=4, **kwargs)


def test_schedule_upsamples_z_only_in_the_finest_stages():
    assert upsample_schedule((4, 16, 16)) == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert upsample_schedule((1, 8, 8)) == [(1, 1, 1), (1, 2, 2), (1, 2, 2), (1, 2, 2)]
    for patch in [(4, 16, 16), (2, 8, 16), (16, 16, 16)]:
        assert tuple(np.prod(upsample_schedule(patch), axis=0)) == patch
    with pytest.raises(ModelError, match="powers of two"):
        upsample_schedule((3, 16, 16))
    with pytest.raises(ModelError, match="powers of two"):
        upsample_schedule((4, 32, 32))


@pytest.mark.parametrize(
    "patch,crop", [((4, 16, 16), (8, 32, 32)), ((2, 8, 8), (4, 16, 24)), ((8, 8, 8), (16, 16, 16))]
)
@pytest.mark.parametrize("skips", [True, False])
def test_output_matches_input_spatial_shape(patch, crop, skips):
    model = tiny_unetr(patch, crop, out_channels=3, skip_connections=skips)
    x = torch.randn(1, 1, *crop)
    assert model(x).shape == (1, 3, *crop)
    probs = model.predict(x)
    assert probs.min() >= 0 and probs.max() <= 1


def test_decoder_features_give_four_levels_coarse_to_fine():
    model = tiny_unetr(skip_connections=False, out_channels=1)
    levels = model.decoder_features(torch.randn(2, 1, 8, 32, 32))
    shapes = [tuple(f.shape) for f in levels]
    assert shapes == [(2, 32, 2, 4, 4), (2, 16, 2, 8, 8), (2, 8, 4, 16, 16), (2, 4, 8, 32, 32)]
    assert model.skip1 is None and model.skip_input is None
    with_skips = tiny_unetr(skip_connections=True)
    assert [
        tuple(f.shape) for f in with_skips.decoder_features(torch.randn(2, 1, 8, 32, 32))
    ] == shapes
    assert sum(p.numel() for p in with_skips.parameters()) > sum(
        p.numel() for p in model.parameters()
    )


@pytest.mark.parametrize("skips", [True, False])
def test_gradients_reach_the_encoder(skips):
    model = tiny_unetr(skip_connections=skips)
    model(torch.randn(1, 1, 8, 32, 32)).square().mean().backward()
    encoder = model.encoder
    for param in (
        encoder.patch_embed.proj.weight,
        encoder.pos_embed,
        encoder.blocks[0].attn.qkv.weight,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_skips_carry_intermediate_blocks():
    """With skips, the first block's output reaches the head by a path that skips blocks 2-4."""
    model = tiny_unetr(skip_connections=True)
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.encoder.blocks[0].mlp.fc2.bias += 0.5  # shifts hidden state 1 (and all later ones)
        changed = model(x)
    assert not torch.allclose(before, changed)


def test_bf16_autocast_forward_is_finite():
    model = tiny_unetr()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 1, 8, 32, 32))
    assert torch.isfinite(out.float()).all()


def test_larger_input_than_the_training_crop_runs():
    """Blockwise inference feeds bigger blocks: position embeddings follow the token grid."""
    model = tiny_unetr()
    assert model(torch.randn(1, 1, 12, 48, 64)).shape == (1, 3, 12, 48, 64)


def test_config_builds_a_unetr():
    cfg = validate(
        UNETRConfig,
        {
            "encoder": {"size": None, "width": 32, "depth": 4, "heads": 4, "img_size": [8, 32, 32]},
            "out_channels": 1,
            "feature_size": 4,
        },
    )
    model = build_unetr(cfg)
    assert model.out_channels == 1 and model(torch.randn(1, 1, 8, 32, 32)).shape == (
        1,
        1,
        8,
        32,
        32,
    )


# -- loading pretrained encoders ------------------------------------------------------------------


def pretrained_mae(pos_embed="learned", crop=(8, 32, 32)):
    torch.manual_seed(1)
    cfg = validate(
        MAEConfig,
        {
            "encoder": {
                "size": None,
                "width": 32,
                "depth": 4,
                "heads": 4,
                "img_size": list(crop),
                "pos_embed": pos_embed,
            },
            "decoder_width": 16,
            "decoder_depth": 1,
            "decoder_heads": 4,
        },
    )
    mae = build_mae3d(cfg)
    # one training step so the weights differ from any fresh init
    mask = RandomMasker().mask((1, *mae.encoder.grid), np.random.default_rng(0))
    mae(torch.randn(1, 1, *crop), mask).loss.backward()
    with torch.no_grad():
        for p in mae.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad.sign()
    return mae


def test_load_encoder_round_trip_with_a_different_crop_interpolates_pos_embed():
    mae = pretrained_mae(crop=(8, 32, 32))  # token grid 2x2x2
    model = tiny_unetr(crop=(16, 64, 48))  # token grid 4x4x3
    report = load_encoder(model, mae.state_dict(), prefix="encoder.")
    assert report.missing == [] and report.unexpected == []
    assert any("pos_embed (2, 2, 2)->(4, 4, 3)" in note for note in report.resized)
    own = model.encoder.state_dict()
    for key, value in mae.encoder.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(own[key], value), key
    torch.testing.assert_close(
        own["pos_embed"], resize_pos_embed(mae.encoder.pos_embed.detach(), (4, 4, 3))
    )
    # same crop: everything, position embedding included, is copied exactly
    same = tiny_unetr(crop=(8, 32, 32))
    assert load_encoder(same, mae.state_dict()).resized == []
    assert torch.equal(same.encoder.pos_embed, mae.encoder.pos_embed)
    # a bare encoder's state dict loads with prefix ""
    bare = ViT3D(img_size=(8, 32, 32), embed_dim=32, depth=4, num_heads=4, pos_embed="learned")
    assert load_encoder(bare, mae.encoder.state_dict(), prefix="").missing == []


def test_load_encoder_keeps_a_sincos_table_and_folds_depth_embeddings():
    mae = pretrained_mae(pos_embed="sincos", crop=(8, 32, 32))
    target = ViT3D(img_size=(16, 32, 32), embed_dim=32, depth=4, num_heads=4, pos_embed="sincos")
    table = target.pos_embed.clone()
    report = load_encoder(target, mae.state_dict())
    assert report.missing == [] and torch.equal(target.pos_embed, table) and report.resized
    # a 2D->3D transfer (yx_depth) encoder into a full-grid learned encoder: pos + depth folded in
    source = ViT3D(img_size=(8, 32, 32), embed_dim=32, depth=4, num_heads=4, pos_embed="yx_depth")
    with torch.no_grad():
        source.depth_embed.normal_()
    learned = ViT3D(img_size=(8, 32, 32), embed_dim=32, depth=4, num_heads=4, pos_embed="learned")
    report = load_encoder(learned, source.state_dict(), prefix="")
    assert report.unexpected == [] and report.missing == []
    torch.testing.assert_close(
        learned.pos_embed.reshape(1, -1, 32), source.pos_embed_for(source.grid), rtol=0, atol=1e-6
    )


def test_load_encoder_errors_are_actionable():
    mae = pretrained_mae()
    with pytest.raises(ModelError, match="no checkpoint key starts with 'backbone.'"):
        load_encoder(tiny_unetr(), mae.state_dict(), prefix="backbone.")
    wide = ViT3D(img_size=(8, 32, 32), embed_dim=64, depth=4, num_heads=4, pos_embed="learned")
    with pytest.raises(ModelError, match="different"):
        load_encoder(wide, mae.state_dict())
    other_patch = ViT3D(
        img_size=(8, 32, 32), patch_size=(2, 8, 8), embed_dim=32, depth=4, num_heads=4
    )
    with pytest.raises(ModelError, match="patch_embed.proj.weight"):
        load_encoder(other_patch, mae.state_dict())
    with pytest.raises(ModelError, match="yx_depth"):
        shared = ViT3D(
            img_size=(8, 32, 32), embed_dim=32, depth=4, num_heads=4, pos_embed="yx_depth"
        )
        load_encoder(shared, mae.state_dict())


def test_extra_and_missing_keys_are_reported():
    mae = pretrained_mae()
    state = {k: v for k, v in mae.state_dict().items() if not k.startswith("encoder.norm.")}
    state["encoder.extra_head.weight"] = torch.zeros(3)
    report = load_encoder(tiny_unetr(), state)
    assert report.missing == ["norm.bias", "norm.weight"]
    assert report.unexpected == ["extra_head.weight"]
    assert "norm.bias" in report.summary()


# -- optimiser helpers ----------------------------------------------------------------------------


def test_layer_decay_groups_cover_every_parameter_once_with_decaying_rates():
    model = tiny_unetr()
    groups = param_groups_lrd(model, base_lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    scale = {}
    for group in groups:
        for param in group["params"]:
            scale[id(param)] = group["lr_scale"]
            assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
            if param.ndim <= 1:
                assert group["weight_decay"] == 0.0
    enc = model.encoder
    assert scale[id(enc.patch_embed.proj.weight)] == pytest.approx(0.5**5)
    assert scale[id(enc.blocks[0].attn.qkv.weight)] == pytest.approx(0.5**4)
    assert scale[id(enc.blocks[3].attn.qkv.weight)] == pytest.approx(0.5)
    assert scale[id(enc.norm.weight)] == scale[id(model.head.weight)] == 1.0
    assert (
        next(g for g in groups if any(p is enc.pos_embed for p in g["params"]))["weight_decay"] == 0
    )
    torch.optim.AdamW(groups)  # groups are valid optimiser input


def test_freeze_encoder_stops_its_gradients_and_unfreeze_restores_them():
    model = tiny_unetr()
    optimiser = torch.optim.AdamW(param_groups_lrd(model, 1e-3))
    assert freeze_encoder(model) == len(list(model.encoder.parameters()))
    model(torch.randn(1, 1, 8, 32, 32)).mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.weight.grad is not None
    before = model.encoder.blocks[0].attn.qkv.weight.clone()
    optimiser.step()
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, before)
    freeze_encoder(model, frozen=False)
    model(torch.randn(1, 1, 8, 32, 32)).mean().backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
