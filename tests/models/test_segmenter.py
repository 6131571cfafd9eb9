"""The segmenter factory and the checkpoint contract, without Ray or training code."""

from __future__ import annotations

import json

import pytest
import torch

from neuroray.errors import NeurorayError
from neuroray.models.checkpoint import load_model_checkpoint, write_model_file
from neuroray.models.segmenter import (
    SEGMENTERS,
    SegmenterConfig,
    build_segmenter,
    load_segmenter,
)

torch.set_num_threads(1)

TINY = {"size": None, "width": 32, "depth": 2, "heads": 2, "img_size": [8, 32, 32],
        "pos_embed": "learned"}


def test_unetr_and_unet_are_registered_and_names_are_checked():
    assert {"unetr", "unet"} <= set(SEGMENTERS)
    with pytest.raises(ValueError, match="did you mean 'unetr'"):
        SegmenterConfig(name="unetrr")


@pytest.mark.parametrize("name", SEGMENTERS.names())
def test_every_registered_segmenter_builds_runs_and_counts_its_outputs(name):
    cfg = SegmenterConfig(name=name, encoder=TINY).with_window((8, 32, 32))
    model, note, built = build_segmenter(cfg, 2)
    assert "scratch" in note and built.window == (8, 32, 32)
    assert SEGMENTERS.get(name).out_channels(model.state_dict()) == 2
    with torch.no_grad():
        assert model(torch.rand(1, 1, 8, 32, 32)).shape == (1, 2, 8, 32, 32)


def test_a_unet_refuses_pretrained_init_and_says_which_model_takes_one():
    with pytest.raises(ValueError, match="model.init must be scratch.*use model.name=unetr"):
        SegmenterConfig(name="unet", init="checkpoint:runs/mae")


def test_a_unet_checkpoint_reloads_with_its_window_and_chosen_threshold(tmp_path):
    torch.manual_seed(0)
    cfg = SegmenterConfig(name="unet", unet={"channels": [4, 8], "window": [4, 16, 16]})
    model, _, _ = build_segmenter(cfg, 1)
    job = {"task": "mito", "model": cfg.model_dump(mode="json")}
    write_model_file(tmp_path, kind="finetune_mito", step=3, state_dict=model.state_dict(),
                     encoder_prefix="encoder.", job_json=json.dumps(job),
                     postprocess={"threshold": 0.4})
    loaded, info = load_segmenter(str(tmp_path))
    assert (info.task, info.window, info.threshold, info.model.name) == (
        "mito", (4, 16, 16), 0.4, "unet")
    x = torch.rand(1, 1, 4, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_finetuned_checkpoint_reloads_from_its_job_as_plain_data(tmp_path):
    """What blockwise needs: the network, its task, output channels and window."""
    torch.manual_seed(0)
    model, _, _ = build_segmenter(SegmenterConfig(encoder=TINY, feature_size=4), 3)
    job = {  # a fine-tuning job's JSON: sections the models layer does not know are ignored
        "task": "em",
        "data": {"image": "somewhere"},
        "model": {"encoder": TINY, "feature_size": 4, "init": "checkpoint:/gone",
                  "freeze_encoder_steps": 5},
    }
    write_model_file(tmp_path, kind="finetune_em", step=7, state_dict=model.state_dict(),
                     encoder_prefix="encoder.", job_json=json.dumps(job))
    assert load_model_checkpoint(tmp_path)["step"] == 7
    loaded, info = load_segmenter(str(tmp_path))
    assert (info.task, info.out_channels, info.window, info.step) == ("em", 3, (8, 32, 32), 7)
    assert info.threshold is None  # written before thresholds travelled with the model
    assert info.model.init == "scratch" and info.model.encoder.img_size == info.window
    x = torch.rand(1, 1, 8, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_pretraining_checkpoint_is_not_a_segmenter(tmp_path):
    write_model_file(tmp_path, kind="mae", step=1, state_dict={}, encoder_prefix="encoder.",
                     job_json="{}")
    with pytest.raises(NeurorayError, match="mae checkpoint; segmenting needs a fine-tuned one"):
        load_segmenter(str(tmp_path))
