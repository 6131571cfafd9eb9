"""The shipped job YAMLs: package data found from an install, linked from the checkout's configs/,
and the configs the demo runs (with its overrides) and the benchmarks measure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from neuroray import configs
from neuroray.config import override, parse_override
from neuroray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_is_package_data_and_linked_from_the_checkout():
    names = configs.names()
    assert {"finetune_em", "finetune_mito", "finetune_lm", "pretrain_mae", "pretrain_dbmim",
            "pretrain_mscon", "sweep_em", "sweep_lm"} <= set(names)  # fmt: skip
    for name in names:
        file = configs.path(name)
        assert file.parent == REPO / "neuroray" / "configs"
        assert configs.path(f"{name}.yaml") == file
        assert (REPO / "configs" / f"{name}.yaml").read_bytes() == file.read_bytes()
    assert os.path.islink(REPO / "configs")  # one copy: configs -> neuroray/configs
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"neuroray.configs" = ["*.yaml"]' in pyproject


def test_an_unknown_config_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'finetune_em'"):
        configs.path("finetune_emm")


@pytest.mark.parametrize("value", ["/data/a b/c: d#e", "checkpoint:/x", [0, 0, 34], None, 1e-3])
def test_override_round_trips_any_value(value):
    assert parse_override(override("a.b", value)) == (["a", "b"], value)


def test_demo_stages_load_the_shipped_configs_with_their_overrides(tmp_path):
    from neuroray import demo
    from neuroray.agents.dbmim import DbMiMJob
    from neuroray.trainers.finetune import FinetuneJob

    for name in ("raw", "labels", "ckpt", "image", "mask"):
        (tmp_path / name).mkdir()
    run = demo.DemoRun(out=tmp_path / "out")
    pre = demo.load_job(
        run, "pretrain", DbMiMJob, "pretrain_dbmim", demo.PRETRAIN_OVERRIDES,
        {"data.image": str(tmp_path / "raw")},
    )  # fmt: skip
    em = demo.load_job(
        run, "finetune", FinetuneJob, "finetune_em", demo.FINETUNE_EM_OVERRIDES,
        {"data.image": str(tmp_path / "raw"), "data.labels": str(tmp_path / "labels"),
         "model.init": f"checkpoint:{tmp_path / 'ckpt'}"},
    )  # fmt: skip
    lm = demo.load_job(
        run, "lm", FinetuneJob, "finetune_lm", demo.FINETUNE_LM_OVERRIDES,
        {"data.image": str(tmp_path / "image"), "data.labels": str(tmp_path / "mask"),
         "model.init": "scratch"},
    )  # fmt: skip
    # the demo's sizes: a 96-wide, 4-deep encoder on 16x64x64 crops, short runs
    for job in (pre, em, lm):
        encoder = job.model.encoder
        assert (encoder.width, encoder.depth, encoder.heads) == (96, 4, 3)
        assert list(encoder.img_size) == list(job.data.sampler.crop_shape) == [16, 64, 64]
        assert job.run.storage_path == str(tmp_path / "out" / "runs")
    assert (pre.run.steps, em.run.steps, lm.run.steps) == (60, 150, 150)
    assert pre.rl.ppo.train_batch_agent_steps == 512 and pre.masking.name == "policy"
    assert em.task == "em" and em.targets.grow_boundary == 1 and em.optim.layer_decay is None
    assert lm.task == "lm" and lm.data.augment == [] and lm.model.inflate == "center"
    # held-out data: the fine-tunes train, validate (choose thresholds) and are scored on
    # disjoint parts; the scored part is neither trained on nor validated on
    for job, (train, valid, test) in (
        (em, (demo.EM_TRAIN_ROI, demo.EM_VALID_ROI, demo.EM_TEST_ROI)),
        (lm, (demo.LM_TRAIN_ROI, demo.LM_VALID_ROI, demo.LM_TEST_ROI)),
    ):
        assert list(job.data.sampler.roi) == train and list(job.validation.roi) == valid
        assert train[3] <= valid[0] < valid[3] <= test[0]  # z slabs in this order, disjoint
    # LM: the foreground cut is chosen on validation from a range that reaches high cuts
    assert max(lm.validation.binary_thresholds) >= 0.95
    # what each stage ran is recorded for demo_summary.json
    assert run.jobs["lm"]["config"] == "configs/finetune_lm.yaml"
    assert 'data.image="' + str(tmp_path / "image") + '"' in run.jobs["lm"]["overrides"]
    json.dumps(run.jobs)
