"""MS-Con model and losses: pyramid tokens, a real InfoNCE (vs the published degenerate form),
gradients of every term, bf16 autocast, views, configs and the encoder checkpoint contract, for
the fast default and the published variant."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuroray.config import validate
from neuroray.errors import ConfigError
from neuroray.models.mscon import (
    ENCODER_PREFIX,
    VARIANTS,
    MSConConfig,
    MSConLossConfig,
    build_mscon,
    consistency,
    info_nce,
)
from neuroray.models.unetr import UNETRConfig, build_unetr, load_encoder
from neuroray.platform.augment import MSConAugmentConfig
from neuroray.platform.volume import open_volume
from neuroray.trainers.mscon import MSConJob, draw_views

CROP = (8, 32, 32)
VARIANT_NAMES = ["fast", "published"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ENCODER = {"size": None, "width": 32, "depth": 2, "heads": 2, "img_size": list(CROP)}


def tiny_config(**changes) -> MSConConfig:
    spec = {
        "encoder": ENCODER,
        "feature_size": 4,
        "pool_grid": [2, 4, 4],
        "token_dim": 16,
        "attention_heads": 2,
    }
    return validate(MSConConfig, {**spec, **changes})


def tiny_model(seed: int = 0, loss: MSConLossConfig | None = None, **changes):
    torch.manual_seed(seed)
    return build_mscon(tiny_config(**changes), loss)


def degenerate_contrast(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1):
    """The published "contrastive" loss: a softmax over the positive pairs only, no negatives.

    It is minimal (log N) whenever all positive similarities are equal, whatever their value:
    two views that are exact opposites (every similarity -1) score as well as identical ones.
    """
    za = F.normalize(a.flatten(0, 1), dim=-1)
    zb = F.normalize(b.flatten(0, 1), dim=-1)
    return -F.log_softmax((za * zb).sum(-1) / temperature, dim=0).mean()


def prefers_aligned(loss, a, aligned, mismatched) -> bool:
    """The judged property: the loss is lower for the aligned views than for every mismatch."""
    good = float(loss(a, aligned))
    return all(good < float(loss(a, other)) for other in mismatched)


@pytest.fixture(scope="module")
def em_views(em_raw):
    """Weak / strong / clean views of three EM crops far apart in the cube: the 250^3 FIB-SEM
    cube where the data is, the synthetic 64 x 128 x 128 one otherwise."""
    volume = open_volume(em_raw.raw)
    if em_raw.real:
        starts = [(0, 0, 0), (100, 150, 60), (200, 30, 180)]
    else:
        starts = [(0, 0, 0), (28, 90, 40), (56, 30, 96)]
    crops = np.stack(
        [volume[z : z + CROP[0], y : y + CROP[1], x : x + CROP[2]] for z, y, x in starts]
    )
    images = torch.from_numpy(crops.astype(np.float32) / 255)[:, None]
    return draw_views(images, MSConAugmentConfig(), np.random.default_rng(0), volume.voxel_size)


# -- the contrastive loss ------------------------------------------------------------------------


def training_tokens(model, weak, strong, seed: int = 0):
    """Both views' pyramid tokens as a training step computes them: one batch of 2B views, the
    encoder's patches drawn as forward draws them (all of them in the published variant)."""
    views = torch.cat([weak, strong])
    keep = model.draw_keep(
        len(views), model.encoder.grid_of(views), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        tokens = model.pyramid_tokens(views, keep)
    return tokens.chunk(2)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_info_nce_prefers_views_of_the_same_crop_and_the_degenerate_form_does_not(
    em_views, variant
):
    # patch 2 x 8 x 8: a 4 x 4 x 4 token grid, of which the fast encoder sees 16
    model = tiny_model(variant=variant, encoder={**ENCODER, "patch_size": [2, 8, 8]}).eval()
    a, b = training_tokens(model, em_views["weak"], em_views["strong"])
    tokens = a.shape[1]
    # published: levels 1..4; fast: level 0 (the token grid, reduced to level 1's width), 1..3
    levels = [8, 4, 2, 1] if variant == "published" else [8, 8, 4, 2]
    assert tokens == model.num_tokens == 4 * sum(levels)
    permuted = b[:, torch.roll(torch.arange(tokens), 1)]  # every channel paired with another
    other_crop = b[[1, 2, 0]]  # the second view of each crop comes from another crop
    opposite = -a  # every positive similarity is -1
    mismatched = [permuted, other_crop, opposite]

    assert prefers_aligned(info_nce, a, b, mismatched)
    # the published form cannot tell: opposite views reach its minimum, log N, which no real
    # pair of views beats
    n = a.shape[0] * tokens
    assert float(degenerate_contrast(a, opposite)) == pytest.approx(math.log(n), abs=1e-5)
    assert float(degenerate_contrast(a, b)) >= math.log(n) - 1e-5
    assert not prefers_aligned(degenerate_contrast, a, b, mismatched)
    # the fast encoder's random patches: aligned views win whichever quarter it sees
    for seed in (1, 2, 3):
        a, b = training_tokens(model, em_views["weak"], em_views["strong"], seed)
        permuted, other_crop = b[:, torch.roll(torch.arange(tokens), 1)], b[[1, 2, 0]]
        assert prefers_aligned(info_nce, a, b, [permuted, other_crop, -a]), seed


def test_info_nce_known_answers():
    torch.manual_seed(0)
    batch, tokens, dim = 2, 6, 32
    # orthonormal tokens: positives 1, negatives 0 -> log(1 + (N - 1) e^(-1/T))
    basis = torch.linalg.qr(torch.randn(dim, dim))[0][: batch * tokens].reshape(batch, tokens, dim)
    n = batch * tokens
    assert float(info_nce(basis, basis, 0.1)) == pytest.approx(
        math.log(1 + (n - 1) * math.exp(-10)), abs=1e-6
    )
    # all similarities equal: chance, log N; scale of the tokens does not matter
    same = torch.ones(batch, tokens, dim)
    assert float(info_nce(same, 3 * same)) == pytest.approx(math.log(n), rel=1e-6)
    # noisy copies beat shuffled channels and swapped samples by a wide margin
    a = torch.randn(batch, tokens, dim)
    b = a + 0.3 * torch.randn_like(a)
    aligned = float(info_nce(a, b))
    assert aligned < 0.1 < float(info_nce(a, b[:, torch.randperm(tokens)]))
    assert aligned < float(info_nce(a, b.flip(0))) - 2
    # symmetric in the two views
    assert float(info_nce(a, b)) == pytest.approx(float(info_nce(b, a)), rel=1e-6)


def test_consistency_is_not_met_by_a_component_all_tokens_share():
    torch.manual_seed(0)
    tokens = torch.randn(2, 10, 16)
    assert float(consistency(tokens, tokens, "cosine")) == pytest.approx(0, abs=1e-6)
    # two sets that agree only through one large shared component (the collapse shortcut)
    common = 10 * torch.randn(1, 1, 16)
    a = common + 0.1 * torch.randn(2, 10, 16)
    b = common + 0.1 * torch.randn(2, 10, 16)
    plain = (2 - 2 * F.cosine_similarity(a, b, dim=-1)).mean()
    assert float(plain) < 0.01  # an uncentred cosine calls them consistent
    assert float(consistency(a, b, "cosine")) > 1.5
    # InfoNCE scores collapsed tokens at chance (log 20) even when both sides are identical
    assert float(consistency(a, b, "infonce")) > math.log(20) - 0.5
    assert float(consistency(a, a, "infonce")) > math.log(20) - 0.5
    assert float(consistency(tokens, tokens, "infonce")) < 0.1
    assert float(consistency(tokens, tokens[:, torch.randperm(10)], "infonce")) > 1


# -- the model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_forward_shapes_terms_and_weights(em_views, variant):
    loss_cfg = MSConLossConfig(recon_weight=1.0, contrast_weight=0.1, cross_weight=0.5)
    model = tiny_model(loss=loss_cfg, variant=variant)
    out = model(em_views["weak"], em_views["strong"], em_views["clean"])
    batch = em_views["weak"].shape[0]
    assert out.recon.shape == (2, batch, 1, *CROP)
    assert out.tokens.shape == (2, batch, model.num_tokens, 16)
    assert set(out.losses) == {"recon", "contrast", "cross_weak", "cross_strong"}
    terms = {k: float(v.detach()) for k, v in out.losses.items()}
    expected = (
        terms["recon"]
        + 0.1 * terms["contrast"]
        + 0.5 * (terms["cross_weak"] + terms["cross_strong"])
    )
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    # the reconstruction term is the MSE of both views' outputs against the clean crop
    recon = F.mse_loss(out.recon.detach(), em_views["clean"].expand(2, *em_views["clean"].shape))
    assert terms["recon"] == pytest.approx(float(recon), rel=1e-5)
    assert 0 <= out.accuracy <= 1


def test_fast_encoder_sees_one_shared_random_quarter_of_the_patches(em_views):
    model = tiny_model(encoder={**ENCODER, "patch_size": [2, 8, 8]})  # grid 4 x 4 x 4
    assert model.visible_fraction == 0.25 and model.decoder_levels == 3
    keep = model.draw_keep(6, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    assert keep.shape == (6, 16) and bool((keep == keep[:1]).all())  # every crop and view alike
    assert torch.equal(keep[0], keep[0].unique())  # 16 distinct tokens, in token order
    again = model.draw_keep(6, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    other = model.draw_keep(6, (4, 4, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    # level 0 holds the encoder's tokens where seen and the learned mask token elsewhere
    views = em_views["weak"][:2]
    with torch.no_grad():
        grid = model.encode(views, keep[:2]).flatten(2).transpose(1, 2)  # [B, N, D]
        seen = model.encoder.forward_features(views, keep=keep[:2]).tokens
    hidden = torch.ones(64, dtype=torch.bool)
    hidden[keep[0]] = False
    torch.testing.assert_close(grid[:, keep[0]], seen)
    assert torch.equal(grid[:, hidden], model.mask_token.detach().expand(2, 48, -1))
    # a given keep makes the step deterministic; by default each step draws its own
    weak, strong, clean = (em_views[k][:2] for k in ("weak", "strong", "clean"))
    with torch.no_grad():
        first = float(model(weak, strong, clean, keep=keep[:4]).loss)
        assert first == float(model(weak, strong, clean, keep=keep[:4]).loss)
    # the published variant sees every patch and has no mask token
    published = tiny_model(variant="published")
    assert published.draw_keep(6, (2, 2, 2)) is None and published.mask_token is None


@pytest.mark.parametrize(
    ("variant", "skip_connections"), [("fast", False), ("published", False), ("published", True)]
)
@pytest.mark.parametrize("cross_loss", ["infonce", "cosine"])
def test_every_term_reaches_the_encoder(em_views, variant, skip_connections, cross_loss):
    model = tiny_model(
        loss=MSConLossConfig(cross_loss=cross_loss),
        variant=variant,
        skip_connections=skip_connections,
    )
    out = model(em_views["weak"][:2], em_views["strong"][:2], em_views["clean"][:2])
    encoder = [model.encoder.patch_embed.proj.weight, model.encoder.blocks[0].attn.qkv.weight]
    for name, term in out.losses.items():
        grads = torch.autograd.grad(term, encoder, retain_graph=True)
        for grad in grads:
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # the cross terms train the shared attention, the contrast and cross terms the projectors
    attention = model.cross_attention.in_proj_weight
    for name in ("cross_weak", "cross_strong"):
        assert torch.autograd.grad(out.losses[name], attention, retain_graph=True)[0].abs().sum()
    grad = torch.autograd.grad(
        out.losses["contrast"], model.projectors[0].weight, retain_graph=True
    )[0]
    assert grad.abs().sum() > 0
    # every parameter is used (DDP waits for each one's gradient): no stage is built and idle
    out.loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_loss_is_finite_under_bf16_autocast(em_views):
    model = tiny_model()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(em_views["weak"][:2], em_views["strong"][:2], em_views["clean"][:2])
    assert out.tokens.dtype == torch.bfloat16  # the network really ran in bf16
    for name, term in out.losses.items():
        assert term.dtype == torch.float32 and torch.isfinite(term), name
    out.loss.backward()
    grad = model.encoder.patch_embed.proj.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_checkpoint_encoder_initialises_a_unetr(variant):
    model = tiny_model(seed=3, variant=variant)
    state = model.state_dict()
    heads = ("unetr.", "projectors.", "cross_attention.", "mask_token", "level0.")
    assert all(k.startswith(heads) for k in state)
    unetr = build_unetr(
        UNETRConfig(encoder=tiny_config().encoder, out_channels=3, skip_connections=True)
    )
    report = load_encoder(unetr, state, prefix=ENCODER_PREFIX)
    assert report.loaded and report.missing == [] and report.unexpected == []
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(unetr.encoder.state_dict()[key], value), key
    if variant == "fast":  # three stages and a 2x2x2-block head: not UNETR's whole decoder
        assert not any(k.startswith("unetr.up4.") for k in state)
        assert state["unetr.head.weight"].shape == (8, 1, 2, 2, 2)
        return
    # without skips the whole decoder has UNETR's own names, so it could be reused as well
    plain = build_unetr(
        UNETRConfig(
            encoder=tiny_config().encoder, out_channels=1, skip_connections=False, feature_size=4
        )
    )
    decoder = {k.removeprefix("unetr."): v for k, v in state.items() if k.startswith("unetr.")}
    plain.load_state_dict(decoder)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_raw_tokens_without_projection_are_pooled_maps(em_views, variant):
    model = tiny_model(token_dim=None, attention_heads=4, variant=variant)
    with torch.no_grad():
        features = model.feature_levels(em_views["weak"])
        tokens = model.pyramid_tokens(em_views["weak"])
    assert len(features) == (5 if variant == "published" else 4)  # levels 0..4 or 0..3
    assert tokens.shape[-1] == 2 * 4 * 4
    finest = F.adaptive_avg_pool3d(features[-1], (2, 4, 4)).flatten(2)
    assert finest.shape[1] == (4 if variant == "published" else 8)  # level 4 or 3
    torch.testing.assert_close(tokens[:, -finest.shape[1] :], finest)


# -- views and configs ---------------------------------------------------------------------------


def test_views_are_seeded_and_share_the_clean_crop():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((2, 1, *CROP), dtype=np.float32))
    augment = MSConAugmentConfig(shared=[])
    first = draw_views(images, augment, np.random.default_rng(5), (10, 10, 10))
    again = draw_views(images, augment, np.random.default_rng(5), (10, 10, 10))
    other = draw_views(images, augment, np.random.default_rng(6), (10, 10, 10))
    for name in ("clean", "weak", "strong"):
        assert first[name].shape == images.shape and first[name].dtype == torch.float32
        assert torch.equal(first[name], again[name])
    torch.testing.assert_close(first["clean"], images)  # no shared transform: clean = input
    assert not torch.equal(first["weak"], first["strong"])
    assert not torch.equal(first["strong"], other["strong"])


def test_example_config_loads_with_the_fast_default_and_the_published_variant_by_name():
    from neuroray.config import load_config

    path = REPO / "configs" / "pretrain_mscon.yaml"
    job = load_config(MSConJob, path)
    assert job.model.variant == "fast" and job.model.architecture() == VARIANTS["fast"]
    assert job.model.skip_connections is False
    assert (job.loss.recon_weight, job.loss.contrast_weight, job.loss.cross_weight) == (1, 0.1, 0.5)
    assert job.loss.temperature == 0.1
    assert job.augment == MSConAugmentConfig()  # the explicit lists are the named defaults
    assert {spec["name"] for spec in job.augment.strong} >= {
        "cutout",
        "gaussian_blur",
        "gaussian_noise",
        "missing_sections",
        "misalignment",
        "elastic",
    }
    published = load_config(MSConJob, path, ["model.variant=published"]).model.architecture()
    assert published == VARIANTS["published"]
    assert (published.feature_size, published.decoder_levels) == (16, 4)
    assert published.pool_grid == (16, 16, 16) and published.visible_fraction == 1
    # an explicit field overrides the variant's value; the others stay the variant's
    mixed = load_config(MSConJob, path, ["model.pool_grid=[16, 16, 16]"]).model.architecture()
    assert mixed == dataclasses.replace(VARIANTS["fast"], pool_grid=(16, 16, 16))


def test_config_errors_are_actionable():
    with pytest.raises(ConfigError, match="attention_heads"):
        tiny_config(token_dim=10, attention_heads=4)
    with pytest.raises(ConfigError, match="variant=published"):
        tiny_config(skip_connections=True)  # the fast default hides patches
    tiny_config(skip_connections=True, variant="published")
    with pytest.raises(ConfigError, match="decoder_levels"):
        tiny_config(decoder_levels=2)
    with pytest.raises(ConfigError, match="variant"):
        tiny_config(variant="quick")
    with pytest.raises(ConfigError, match="nothing would be learned"):
        validate(MSConLossConfig, {"recon_weight": 0, "contrast_weight": 0, "cross_weight": 0})
    data = {"image": "layer", "sampler": {"crop_shape": list(CROP)}}
    model = tiny_config().model_dump()
    with pytest.raises(ConfigError, match="data.augment"):
        validate(MSConJob, {"data": {**data, "augment": "em"}, "model": model})
    with pytest.raises(ConfigError, match="crop_shape"):
        validate(
            MSConJob, {"data": {**data, "sampler": {"crop_shape": [16, 32, 32]}}, "model": model}
        )
    job = validate(MSConJob, {"data": data, "model": model})
    assert MSConJob.model_validate_json(job.model_dump_json()) == job
