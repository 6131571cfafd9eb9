"""ViT3D: patch layout, position embeddings, hidden states, visible-token encoding, timm naming."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from neuroray.config import validate
from neuroray.errors import ConfigError
from neuroray.models.vit3d import (
    ModelError,
    PatchEmbed3D,
    ViT3D,
    ViTConfig,
    build_vit3d,
    hidden_indices,
    patchify,
    resize_pos_embed,
    sincos_pos_embed_3d,
    token_grid,
    unpatchify,
)

torch.set_num_threads(1)
CROP, PATCH = (8, 64, 64), (4, 16, 16)


def tiny(**kwargs) -> ViT3D:
    torch.manual_seed(0)
    options = dict(img_size=CROP, patch_size=PATCH, embed_dim=64, depth=4, num_heads=4)
    options.update(kwargs)
    return ViT3D(**options).eval()


@pytest.mark.parametrize(
    "shape,patch", [((2, 1, 8, 64, 64), (4, 16, 16)), ((1, 2, 6, 12, 20), (2, 3, 5))]
)
def test_patchify_and_unpatchify_are_exact_inverses(shape, patch):
    x = torch.randn(shape)
    grid = token_grid(shape[2:], patch)
    patches = patchify(x, patch)
    assert patches.shape == (
        shape[0],
        grid[0] * grid[1] * grid[2],
        shape[1] * patch[0] * patch[1] * patch[2],
    )
    assert torch.equal(unpatchify(patches, grid, patch), x)
    rows = torch.randn_like(patches)
    assert torch.equal(patchify(unpatchify(rows, grid, patch), patch), rows)


def test_patchify_row_n_is_the_patch_token_n_embeds():
    """The conv patch embedding is a linear map of patchify rows, token for token (same order)."""
    torch.manual_seed(0)
    embed = PatchEmbed3D(PATCH, in_chans=2, embed_dim=8)
    x = torch.randn(2, 2, 8, 32, 48)
    weight = embed.proj.weight.permute(0, 2, 3, 4, 1).reshape(8, -1)  # (pz, py, px, C) order
    expected = patchify(x, PATCH) @ weight.T + embed.proj.bias
    torch.testing.assert_close(embed(x), expected, rtol=1e-4, atol=1e-4)


def test_crop_not_a_multiple_of_the_patch_is_an_actionable_error():
    with pytest.raises(ModelError, match="not a multiple of the patch"):
        token_grid((10, 64, 64), PATCH)
    with pytest.raises(ModelError, match=r"\[B, 1, Z, Y, X\]"):
        tiny()(torch.zeros(1, 2, 8, 64, 64))
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        validate(ViTConfig, {"img_size": [30, 160, 160]})


def test_hidden_indices_are_depth_fractions():
    assert hidden_indices(12) == (3, 6, 9, 12)
    assert hidden_indices(4) == (1, 2, 3, 4)
    assert hidden_indices(24) == (6, 12, 18, 24)
    assert tiny().skip_indices == (1, 2, 3, 4)


def test_forward_features_returns_requested_block_outputs():
    model = tiny()
    x = torch.randn(2, 1, *CROP)
    out = model.forward_features(x, return_hidden=(1, 4))
    assert out.grid == (2, 4, 4) and out.tokens.shape == (2, 32, 64)
    assert [h.shape for h in out.hidden] == [(2, 32, 64)] * 2
    torch.testing.assert_close(model.norm(out.hidden[1]), out.tokens)
    assert not torch.allclose(out.hidden[0], out.hidden[1])
    with pytest.raises(ModelError, match="outside blocks"):
        model.forward_features(x, return_hidden=(5,))


def test_attention_uses_scaled_dot_product_attention_and_matches_the_math_path():
    model = tiny()
    assert all(block.attn.fused_attn for block in model.blocks)
    x = torch.randn(1, 1, *CROP)
    fused = model(x)
    for block in model.blocks:
        block.attn.fused_attn = False
    torch.testing.assert_close(model(x), fused, rtol=1e-4, atol=1e-4)


def test_resize_pos_embed_is_identity_on_the_same_grid():
    pos = torch.randn(1, 2, 4, 4, 64)
    assert resize_pos_embed(pos, (2, 4, 4)) is pos
    model = tiny(pos_embed="learned")
    torch.testing.assert_close(model.pos_embed_for((2, 4, 4)), model.pos_embed.reshape(1, 32, 64))


def test_resize_pos_embed_is_smooth_when_the_grid_changes():
    z, y, x = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), torch.arange(6.0), indexing="ij")
    ramp = torch.stack([z, 2 * y, -x, z + y + x], dim=-1)[None]  # linear in each axis
    for new in [(8, 10, 12), (2, 3, 4), (4, 7, 5)]:
        out = resize_pos_embed(ramp, new)
        assert out.shape == (1, *new, 4)
        # no overshoot and no jumps: bounded by the original range and neighbour steps
        assert (out.amin((1, 2, 3)) >= ramp.amin((1, 2, 3)) - 1e-5).all()
        assert (out.amax((1, 2, 3)) <= ramp.amax((1, 2, 3)) + 1e-5).all()
        for axis in (1, 2, 3):
            step_new = out.diff(dim=axis).abs().amax()
            step_old = ramp.diff(dim=axis).abs().amax()
            scale = max(1.0, ramp.shape[axis] / out.shape[axis])
            assert step_new <= step_old * scale + 1e-5
    # upsampling a ramp keeps it monotone along the axis it increases on
    assert (resize_pos_embed(ramp, (8, 10, 12))[..., 0].diff(dim=1) >= -1e-6).all()


def test_sincos_is_regenerated_exactly_for_another_grid():
    model = tiny(pos_embed="sincos")
    big = model.pos_embed_for((3, 6, 5)).reshape(1, 3, 6, 5, 64)
    torch.testing.assert_close(big, sincos_pos_embed_3d((3, 6, 5), 64))
    torch.testing.assert_close(big[:, :2, :4, :4], model.pos_embed)  # same positions, same values
    assert "pos_embed" in model.state_dict() and "pos_embed" not in dict(model.named_parameters())
    assert model(torch.randn(1, 1, 12, 96, 80)).shape == (1, 3 * 6 * 5, 64)


def test_sincos_embeds_distinct_positions_distinctly():
    emb = sincos_pos_embed_3d((4, 5, 6), 64).reshape(-1, 64)
    distances = torch.cdist(emb, emb) + torch.eye(len(emb)) * 1e3
    assert distances.min() > 0.1


def test_yx_depth_mode_shares_yx_embedding_over_z_with_a_zero_depth_embedding():
    model = tiny(pos_embed="yx_depth")
    assert model.pos_embed.shape == (1, 1, 4, 4, 64) and model.depth_embed.shape == (1, 2, 1, 1, 64)
    assert torch.count_nonzero(model.depth_embed) == 0
    pos = model.pos_embed_for((2, 4, 4)).reshape(2, 4, 4, 64)
    torch.testing.assert_close(pos[0], pos[1])  # depth embedding starts at zero
    with torch.no_grad():
        model.depth_embed[0, 1] += 1.0
    pos = model.pos_embed_for((2, 4, 4)).reshape(2, 4, 4, 64)
    torch.testing.assert_close(pos[1] - pos[0], torch.ones(4, 4, 64))
    assert model.pos_embed_for((4, 6, 6)).shape == (1, 4 * 6 * 6, 64)


def test_masked_tokens_do_not_influence_the_visible_tokens_output():
    model = tiny()
    x = torch.randn(2, 1, *CROP)
    keep = torch.rand(2, 32).argsort(1) < 8  # 8 visible tokens each
    changed = x.clone()
    hidden_voxels = unpatchify((~keep)[..., None].float().expand(-1, -1, 1024), (2, 4, 4), PATCH)
    changed[hidden_voxels.bool()] = torch.randn(int(hidden_voxels.sum()))
    a = model.forward_features(x, keep=keep)
    b = model.forward_features(changed, keep=keep)
    assert a.tokens.shape == (2, 8, 64) and a.valid is None
    torch.testing.assert_close(a.tokens, b.tokens)
    # the full encoder does see the change: attention mixes tokens
    assert not torch.allclose(model(x), model(changed))


def test_unequal_keep_counts_pad_without_leaking_into_each_sample():
    model = tiny()
    x = torch.randn(2, 1, *CROP)
    keep = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    keep[0, 0, :2] = True  # 8 tokens
    keep[1, 1, 3, 1:] = True  # 3 tokens
    out = model.forward_features(x, keep=keep, return_hidden=(2,))
    assert out.tokens.shape == (2, 8, 64)
    assert out.valid.sum(1).tolist() == [8, 3]
    for b in range(2):
        alone = model.forward_features(x[b : b + 1], keep=keep[b : b + 1])
        rows = out.valid[b]
        torch.testing.assert_close(out.tokens[b, rows], alone.tokens[0], rtol=1e-4, atol=1e-5)
        assert torch.equal(out.idx[b, rows], alone.idx[0])
    # indices and a boolean mask select the same tokens
    idx = keep[:1].reshape(1, -1).nonzero()[:, 1][None]
    by_index = model.forward_features(x[:1], keep=idx)
    torch.testing.assert_close(by_index.tokens, out.tokens[:1])


def test_cls_token_is_kept_apart_from_patch_tokens():
    model = tiny(cls_token=True)
    out = model.forward_features(torch.randn(2, 1, *CROP), return_hidden=(4,))
    assert out.tokens.shape == (2, 32, 64) and out.cls.shape == (2, 64)
    assert out.hidden[0].shape == (2, 32, 64)
    assert "cls_token" in model.state_dict() and "cls_token" not in tiny().state_dict()


def test_block_and_norm_keys_match_timm_vision_transformer():
    """2D->3D transfer copies timm blocks/norms by key: names and shapes must be identical."""
    model = tiny()
    vit2d = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {
        k: v.shape for k, v in vit2d.state_dict().items() if k.startswith(("blocks.", "norm."))
    }
    assert theirs and all(ours.get(k) == s for k, s in theirs.items())
    result = model.load_state_dict(
        {k: v for k, v in vit2d.state_dict().items() if k in theirs}, strict=False
    )
    assert not result.unexpected_keys
    assert set(result.missing_keys) == {
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "pos_embed",
    }
    assert model.patch_embed.proj.weight.shape == (64, 1, 4, 16, 16)


@pytest.mark.parametrize(
    "size,dims", [("tiny", (192, 12, 3)), ("small", (384, 12, 6)), ("base", (768, 12, 12))]
)
def test_named_sizes(size, dims):
    assert ViTConfig(size=size).dims() == dims


def test_config_overrides_and_builds():
    cfg = validate(
        ViTConfig,
        {
            "size": "small",
            "depth": 2,
            "img_size": [8, 32, 32],
            "pos_embed": "learned",
            "drop_path": 0.1,
        },
    )
    assert cfg.dims() == (384, 2, 6)
    model = build_vit3d(cfg)
    assert model.depth == 2 and model.embed_dim == 384 and model.grid == (2, 2, 2)
    with pytest.raises(ConfigError, match="width, depth and heads"):
        validate(ViTConfig, {"size": None, "width": 64})
    with pytest.raises(ConfigError, match="not divisible by heads"):
        validate(ViTConfig, {"size": None, "width": 64, "depth": 2, "heads": 5})
