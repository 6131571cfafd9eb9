"""The residual 3D U-Net: shapes, anisotropic factors, windows, and that it can learn."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from neuroray.models.unet import UNET_SIZES, UNet3D, UNetConfig

torch.set_num_threads(1)


@pytest.mark.parametrize("size", sorted(UNET_SIZES))
def test_every_named_size_maps_a_crop_to_logits_of_the_same_shape(size):
    model = UNet3D(UNetConfig(size=size), out_channels=3)
    total = UNetConfig(size=size).total_downsample
    x = torch.rand(1, 1, 2 * total[0], 2 * total[1], 2 * total[2])
    with torch.no_grad():
        assert model(x).shape == (1, 3, *x.shape[2:])


def test_the_first_pooling_keeps_z_so_thin_sections_are_not_merged_early():
    cfg = UNetConfig(channels=(4, 8, 16))
    assert cfg.factors == ((1, 2, 2), (2, 2, 2))
    assert cfg.total_downsample == (2, 4, 4)
    model = UNet3D(cfg, out_channels=1)
    with torch.no_grad():
        assert model(torch.rand(1, 1, 2, 8, 8)).shape == (1, 1, 2, 8, 8)
        with pytest.raises(ValueError, match=r"not a multiple of its downsampling \(2, 4, 4\)"):
            model(torch.rand(1, 1, 3, 8, 8))


def test_bad_configs_name_the_key_to_fix():
    with pytest.raises(ValidationError, match="needs 2 factors"):
        UNetConfig(channels=(4, 8, 16), downsample=[(1, 2, 2)])
    with pytest.raises(ValidationError, match=r"window \(9, 64, 64\) must be a multiple"):
        UNetConfig(size="small", window=(9, 64, 64))
    with pytest.raises(ValidationError, match="at least two levels"):
        UNetConfig(channels=(4,))


def test_without_normalisation_the_network_still_maps_shapes():
    model = UNet3D(UNetConfig(channels=(4, 8), norm="none"), out_channels=2)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    with torch.no_grad():
        assert model(torch.rand(1, 1, 2, 8, 8)).shape == (1, 2, 2, 8, 8)


@pytest.mark.parametrize("norm", ["group", "instance", "batch"])
def test_each_normalisation_learns_a_known_boundary_map(norm):
    """A dark plane in a bright volume: the network learns to mark it, well below the loss of
    the best constant guess (0.38 nats for 2 of 16 columns)."""
    torch.manual_seed(0)
    model = UNet3D(UNetConfig(channels=(4, 8), norm=norm), out_channels=1)
    image = torch.ones(2, 1, 4, 16, 16)
    image[..., 7:9] = 0.0  # a membrane at x = 7, 8
    target = (image < 0.5).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(image), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.1
