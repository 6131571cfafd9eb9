"""MS-Con model and losses: pyramid tokens, a real InfoNCE (vs the published degenerate form),
gradients of every term, bf16 autocast, views, configs and the encoder checkpoint contract."""

from __future__ import annotations

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
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**changes) -> MSConConfig:
    spec = {
        "encoder": {"size": None, "width": 32, "depth": 2, "heads": 2, "img_size": list(CROP)},
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


def test_info_nce_prefers_views_of_the_same_crop_and_the_degenerate_form_does_not(em_views):
    model = tiny_model().eval()
    with torch.no_grad():
        a = model.pyramid_tokens(em_views["weak"])
        b = model.pyramid_tokens(em_views["strong"])
    tokens = a.shape[1]
    assert tokens == model.num_tokens == 4 * (8 + 4 + 2 + 1)
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


def test_forward_shapes_terms_and_weights(em_views):
    loss_cfg = MSConLossConfig(recon_weight=1.0, contrast_weight=0.1, cross_weight=0.5)
    model = tiny_model(loss=loss_cfg)
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


@pytest.mark.parametrize("skip_connections", [False, True])
@pytest.mark.parametrize("cross_loss", ["infonce", "cosine"])
def test_every_term_reaches_the_encoder(em_views, skip_connections, cross_loss):
    model = tiny_model(
        loss=MSConLossConfig(cross_loss=cross_loss), skip_connections=skip_connections
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
    grad = torch.autograd.grad(out.losses["contrast"], model.projectors[0].weight)[0]
    assert grad.abs().sum() > 0


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


def test_checkpoint_encoder_initialises_a_unetr():
    model = tiny_model(seed=3)
    state = model.state_dict()
    assert all(k.startswith(("unetr.", "projectors.", "cross_attention.")) for k in state)
    unetr = build_unetr(
        UNETRConfig(encoder=tiny_config().encoder, out_channels=3, skip_connections=True)
    )
    report = load_encoder(unetr, state, prefix=ENCODER_PREFIX)
    assert report.loaded and report.missing == [] and report.unexpected == []
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(unetr.encoder.state_dict()[key], value), key
    # without skips the whole decoder has UNETR's own names, so it could be reused as well
    plain = build_unetr(
        UNETRConfig(
            encoder=tiny_config().encoder, out_channels=1, skip_connections=False, feature_size=4
        )
    )
    decoder = {k.removeprefix("unetr."): v for k, v in state.items() if k.startswith("unetr.")}
    plain.load_state_dict(decoder)


def test_raw_tokens_without_projection_are_pooled_maps(em_views):
    model = tiny_model(token_dim=None, attention_heads=4)
    with torch.no_grad():
        features = model.unetr.decoder_features(em_views["weak"])
        tokens = model.pyramid_tokens(em_views["weak"])
    assert tokens.shape[-1] == 2 * 4 * 4
    first = F.adaptive_avg_pool3d(features[0], (2, 4, 4)).flatten(2)
    torch.testing.assert_close(tokens[:, : first.shape[1]], first)


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


def test_example_config_loads_with_the_published_settings():
    from neuroray.config import load_config

    job = load_config(MSConJob, REPO / "configs" / "pretrain_mscon.yaml")
    assert job.model.pool_grid == (16, 16, 16) and job.model.skip_connections is False
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


def test_config_errors_are_actionable():
    with pytest.raises(ConfigError, match="attention_heads"):
        tiny_config(token_dim=10, attention_heads=4)
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
