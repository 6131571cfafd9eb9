"""The run / optim sections every training job has: where a run lives, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuroray.config import validate
from neuroray.errors import ConfigError
from neuroray.trainers.settings import OptimSettings, RunSettings, TrainJob, absolute_storage


def test_local_storage_is_made_absolute_and_remote_storage_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_storage("runs") == str(tmp_path / "runs")
    assert absolute_storage(f"file://{tmp_path}/a/../runs") == str(tmp_path / "runs")
    assert absolute_storage("s3://bucket/runs/") == "s3://bucket/runs"


def test_run_and_tensorboard_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunSettings(name="mae", storage_path="runs")
    assert run.storage_path == str(tmp_path / "runs")  # absolute where the job is built
    assert run.run_dir() == str(tmp_path / "runs" / "mae")
    assert run.tensorboard_path() == tmp_path / "runs" / "mae" / "tensorboard"
    remote = RunSettings(name="mae", storage_path="gs://bucket/runs")
    assert remote.run_dir() == "gs://bucket/runs/mae"
    assert remote.tensorboard_path() == Path("runs") / "mae" / "tensorboard"  # local logs
    chosen = RunSettings(name="mae", tensorboard_dir="tb")
    assert chosen.tensorboard_path() == tmp_path / "tb"


@pytest.mark.parametrize(
    "section, values, field",
    [
        ("run", {"steps": 0}, "steps"),
        ("run", {"time_budget_s": 0}, "time_budget_s"),
        ("run", {"name": "../elsewhere"}, "name"),
        ("optim", {"lr": 0}, "lr"),
        ("optim", {"layer_decay": 1.5}, "layer_decay"),
    ],
)
def test_impossible_values_are_refused_naming_the_field(section, values, field):
    with pytest.raises(ConfigError, match=f"{section}.{field}"):
        validate(TrainJob, {section: values})


def test_defaults_train_on_the_cpu_without_a_time_budget():
    job = TrainJob()
    assert job.run.time_budget_s is None and not job.run.use_gpu
    assert job.optim == OptimSettings()
