"""2D timm ViT -> 3D encoder: inflation identities, copied blocks, the report, loaders, UNETR."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from neuroray.errors import RegistryError
from neuroray.models.encoder_init import EncoderInit
from neuroray.models.segmenter import SegmenterConfig, build_segmenter
from neuroray.models.transfer import (
    INFLATIONS,
    encoder_from_2d,
    load_vit2d,
    sidecar_path,
    transfer_vit2d,
)
from neuroray.models.unetr import UNETRConfig, build_unetr
from neuroray.models.vit3d import ModelError, ViTConfig

torch.set_num_threads(1)

WIDTH, HEADS, DEPTH = 128, 2, 2  # heads = width // 64: what a checkpoint without sidecar implies


def small_vit(**kwargs) -> timm.models.VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    args.update(num_classes=3, **kwargs)
    model = timm.models.VisionTransformer(**args).eval()
    with torch.no_grad():  # non-trivial norms and biases, so "copied" is checked for real
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module", params=["safetensors", "pth"])
def checkpoint(request, tmp_path_factory):
    model = small_vit()
    path = tmp_path_factory.mktemp("vit2d") / f"vit.{request.param}"
    if request.param == "safetensors":
        save_file(model.state_dict(), str(path))
    else:
        torch.save({"state_dict": model.state_dict()}, path)
    return model, path


def grey_image_rgb(seed: int = 1) -> torch.Tensor:
    grey = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(seed))
    return grey


@pytest.mark.parametrize("inflate", INFLATIONS.names())
def test_z_constant_volume_embeds_like_its_slice_in_2d(checkpoint, inflate):
    model, path = checkpoint
    encoder, _ = encoder_from_2d(f"file:{path}", (8, 64, 64), (4, 16, 16), inflate)
    grey = grey_image_rgb()
    volume = grey[:, :, None].expand(1, 1, 8, 64, 64)
    with torch.no_grad():
        emb2d = model.patch_embed(grey.expand(1, 3, 64, 64))  # [1, 16, C]
        emb3d = encoder.patch_embed(volume).reshape(1, 2, 16, WIDTH)  # two depth slices
        tokens2d = emb2d + model.pos_embed[:, 1:]
        tokens3d = (encoder.patch_embed(volume) + encoder.pos_embed_for(encoder.grid)).reshape(
            1, 2, 16, WIDTH
        )
    for z in range(2):
        torch.testing.assert_close(emb3d[:, z], emb2d, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tokens3d[:, z], tokens2d, atol=1e-5, rtol=1e-5)


def test_center_and_average_kernels_have_their_shapes(checkpoint):
    model, path = checkpoint
    summed = model.patch_embed.proj.weight.detach().sum(1)
    center, _ = encoder_from_2d(f"file:{path}", (8, 64, 64), (4, 16, 16), "center")
    average, _ = encoder_from_2d(f"file:{path}", (8, 64, 64), (4, 16, 16), "average")
    w_center = center.patch_embed.proj.weight.detach()[:, 0]  # [C, D, Y, X]
    w_average = average.patch_embed.proj.weight.detach()[:, 0]
    assert torch.equal(w_center[:, 2], summed)
    assert all(torch.count_nonzero(w_center[:, d]) == 0 for d in (0, 1, 3))
    for d in range(4):
        torch.testing.assert_close(w_average[:, d], summed / 4)


def test_blocks_and_norms_are_copied_exactly_and_report_lists_keys(checkpoint):
    model, path = checkpoint
    encoder, report = encoder_from_2d(f"file:{path}", (8, 64, 64), (4, 16, 16), "center")
    source = model.state_dict()
    own = encoder.state_dict()
    block_keys = [k for k in own if k.startswith(("blocks.", "norm."))]
    assert len(block_keys) == 12 * DEPTH + 2
    for key in block_keys:
        assert torch.equal(own[key], source[key]), key
    assert torch.equal(own["patch_embed.proj.bias"], source["patch_embed.proj.bias"])
    torch.testing.assert_close(own["cls_token"], source["cls_token"] + source["pos_embed"][:, :1])
    assert torch.count_nonzero(own["depth_embed"]) == 0

    assert sorted(report.copied) == sorted(block_keys + ["patch_embed.proj.bias"])
    assert report.inflated == ["patch_embed.proj.weight"]
    assert report.interpolated == ["pos_embed"]
    assert report.folded == ["cls_token"]
    assert report.new == ["depth_embed"]
    assert report.dropped == ["head.bias", "head.weight"]
    groups = [report.copied, report.inflated, report.interpolated, report.folded, report.new]
    assert sorted(k for g in groups for k in g) == sorted(own)
    summary = report.summary()
    assert f"copied {len(report.copied)} tensors" in summary and "center" in summary
    assert any("width // 64" in note for note in report.notes)  # no sidecar: heads assumed
    assert report.config.dims() == (WIDTH, DEPTH, HEADS)
    assert report.config.pos_embed == "yx_depth"


@pytest.mark.parametrize("layer_scale", [False, True])
def test_single_depth_encoder_reproduces_2d_features(layer_scale):
    """Nz = 1 and a z-constant volume: the whole 3D encoder computes what the 2D ViT does."""
    model = small_vit(init_values=0.5 if layer_scale else None)
    if layer_scale:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("gamma"):
                    param.copy_(torch.rand_like(param) + 0.5)
    encoder, report = transfer_vit2d(model, (4, 64, 64), (4, 16, 16), "average")
    grey = grey_image_rgb(2)
    with torch.no_grad():
        features2d = model.forward_features(grey.expand(1, 3, 64, 64))  # [1, 1 + 16, C]
        out = encoder.forward_features(grey[:, :, None].expand(1, 1, 4, 64, 64))
    torch.testing.assert_close(out.tokens, features2d[:, 1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.cls, features2d[:, 0], atol=1e-4, rtol=1e-4)
    if layer_scale:
        assert "blocks.0.attn.proj.weight" in report.folded
        assert "blocks.1.ls2.gamma" not in report.dropped  # folded, so used


def test_position_grid_is_interpolated_and_shared_over_depth():
    model = small_vit()
    encoder, report = transfer_vit2d(model, (12, 96, 128), (4, 16, 16))
    assert encoder.grid == (3, 6, 8)
    assert tuple(encoder.pos_embed.shape) == (1, 1, 6, 8, WIDTH)
    pos = encoder.pos_embed_for(encoder.grid).reshape(3, 6, 8, WIDTH)
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[1], pos[2])
    assert any("(4, 4) interpolated to (y, x) (6, 8)" in n for n in report.notes)


def test_fold_normalization_maps_unit_range_grey_to_normalised_rgb():
    model = small_vit()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    model.pretrained_cfg = {"mean": mean, "std": std}
    encoder, report = transfer_vit2d(model, (4, 64, 64), (4, 16, 16), fold_normalization=True)
    grey = grey_image_rgb(3)
    rgb = (grey.expand(1, 3, 64, 64) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]
    with torch.no_grad():
        expected = model.patch_embed(rgb)
        got = encoder.patch_embed(grey[:, :, None].expand(1, 1, 4, 64, 64))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert "patch_embed.proj.bias" in report.folded


def test_other_patch_sizes_are_resampled_and_cls_can_be_dropped():
    model = small_vit()
    encoder, report = transfer_vit2d(model, (8, 32, 32), (2, 8, 8), keep_cls_token=False)
    assert tuple(encoder.patch_embed.proj.weight.shape) == (WIDTH, 1, 2, 8, 8)
    assert encoder.cls_token is None and "cls_token" in report.dropped
    assert any("resampled" in n for n in report.notes)
    assert encoder(torch.rand(1, 1, 8, 32, 32)).shape == (1, 4 * 4 * 4, WIDTH)


def test_sidecar_json_names_the_architecture(tmp_path):
    model = small_vit(num_heads=4)  # not width // 64: only the sidecar can say so
    path = tmp_path / "vit.safetensors"
    save_file(model.state_dict(), str(path))
    args = dict(img_size=64, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=4)
    sidecar_path(path).write_text(json.dumps({"model_args": {**args, "num_classes": 3}}))
    loaded = load_vit2d(f"file:{path}")
    assert loaded.model.blocks[0].attn.num_heads == 4
    _, report = encoder_from_2d(str(path), (4, 64, 64), (4, 16, 16))  # a bare path works too
    assert report.config.dims() == (WIDTH, DEPTH, 4)


def test_unetr_from_2d_and_rebuild_from_report(checkpoint):
    """The segmenter factory (the one encoder-initialisation path) with a 2D source."""
    _, path = checkpoint
    encoder = ViTConfig(size="tiny", img_size=(8, 64, 64), patch_size=(4, 16, 16))
    cfg = SegmenterConfig(init=f"file:{path}", encoder=encoder, feature_size=4)
    model, note, built = build_segmenter(cfg, out_channels=1)
    x = torch.rand(1, 1, 8, 64, 64)
    assert model(x).shape == (1, 1, 8, 64, 64)
    rebuilt = build_unetr(UNETRConfig(encoder=built.encoder, out_channels=1, feature_size=4))
    rebuilt.load_state_dict(model.state_dict(), strict=True)  # same architecture, key for key
    assert "inflated (center)" in note and model.encoder.embed_dim == WIDTH

    scratch, note, built = build_segmenter(cfg.model_copy(update={"init": "scratch"}), 1)
    assert note == "encoder from scratch" and scratch.encoder.embed_dim == 192
    assert built.encoder == encoder


def test_every_transfer_option_reaches_the_segmenter(tmp_path):
    """keep_cls_token, fold_normalization, num_heads and inflate pass through the factory."""
    vit = small_vit(num_heads=4)  # not width // 64, and no sidecar: only num_heads can say so
    path = tmp_path / "vit.safetensors"
    save_file(vit.state_dict(), str(path))
    encoder = ViTConfig(size="tiny", img_size=(8, 64, 64), patch_size=(4, 16, 16))
    options = dict(keep_cls_token=False, fold_normalization=True, num_heads=4, inflate="average")
    cfg = SegmenterConfig(init=f"file:{path}", encoder=encoder, feature_size=4, **options)
    model, note, built_model = build_segmenter(cfg, out_channels=3)
    built = built_model.encoder
    direct, report = encoder_from_2d(f"file:{path}", (8, 64, 64), (4, 16, 16), **options)
    assert built == report.config and built.dims() == (WIDTH, DEPTH, 4)
    assert model.encoder.cls_token is None and not built.cls_token
    assert "folded in" in note and "average" in note
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[key], value)


def test_bad_sources_and_models_raise_model_errors(tmp_path):
    with pytest.raises(ModelError, match="neither"):
        load_vit2d("nothing-here")
    with pytest.raises(ModelError, match="does not exist"):
        load_vit2d(f"file:{tmp_path / 'missing.safetensors'}")
    with pytest.raises(ModelError, match="could not create timm model"):
        load_vit2d("timm:no_such_vit_model_xyz")  # unknown name: fails before any download
    bad = tmp_path / "not_a_vit.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ModelError, match="not a timm VisionTransformer"):
        load_vit2d(f"file:{bad}")
    with pytest.raises(ModelError, match="q_norm"):
        transfer_vit2d(small_vit(qk_norm=True), (4, 64, 64), (4, 16, 16))
    with pytest.raises(ValueError, match="scratch"):
        EncoderInit(init="imagenet")
    with pytest.raises(RegistryError, match="center"):
        INFLATIONS.get("edge")


def google_npz(model: timm.models.VisionTransformer, path) -> None:
    """Write a timm ViT in the augreg .npz layout (the inverse of timm's _load_weights)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    width, heads = model.embed_dim, model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, s = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = b + "MultiHeadDotProductAttention_1/"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = (
                sd[s + norm + ".weight"],
                sd[s + norm + ".bias"],
            )
        qkv_w = sd[s + "attn.qkv.weight"].reshape(3, width, width)
        qkv_b = sd[s + "attn.qkv.bias"].reshape(3, width)
        for j, name in enumerate(("query", "key", "value")):
            w[f"{mha}{name}/kernel"] = qkv_w[j].T.reshape(width, heads, -1)
            w[f"{mha}{name}/bias"] = qkv_b[j].reshape(heads, -1)
        w[f"{mha}out/kernel"] = sd[s + "attn.proj.weight"].T.reshape(heads, -1, width)
        w[f"{mha}out/bias"] = sd[s + "attn.proj.bias"]
        for r in range(2):
            w[f"{b}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{s}mlp.fc{r + 1}.weight"].T
            w[f"{b}MlpBlock_3/Dense_{r}/bias"] = sd[f"{s}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_google_npz_checkpoints_load_through_timm(tmp_path):
    model = small_vit(num_heads=4)  # heads are readable from .npz kernels
    path = tmp_path / "augreg.npz"
    google_npz(model, path)
    loaded = load_vit2d(f"file:{path}")
    assert loaded.model.blocks[0].attn.num_heads == 4
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, atol=1e-6, rtol=0)
    encoder, report = encoder_from_2d(f"file:{path}", (4, 64, 64), (4, 16, 16))
    assert report.config.dims() == (WIDTH, DEPTH, 4)
    torch.testing.assert_close(
        encoder.state_dict()["blocks.1.attn.qkv.weight"],
        model.state_dict()["blocks.1.attn.qkv.weight"],
    )
