"""The shared training loop: parameter groups, checkpoints, starts, and ``fit`` on Ray Train.

The ``fit`` tests plug a task of a few lines (a straight line learnt by a one-weight model) into
the real loop and TorchTrainer, so what they check is the loop itself: user errors come out as
themselves, a time budget stops the run at a checkpoint with the schedule decayed, and a rerun
resumes from the stored step and training time.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray
import torch
from ray.train.v2.api.exceptions import WorkerGroupError
from torch import nn

from neuroray.errors import ConfigError, NeurorayError
from neuroray.models.checkpoint import load_model_checkpoint, load_tensors
from neuroray.trainers.loop import (
    TrainTask,
    WorkerInfo,
    _user_error_in,
    decay_groups,
    fit,
    read_starts,
    save_checkpoint,
)
from neuroray.trainers.schedule import warmup_cosine
from neuroray.trainers.settings import RunSettings, TrainJob

# Ray Train's workers cannot import this test module: its task class travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class LineTask(TrainTask):
    """Fit y = 2x + 1 with one weight and a bias; batches seeded per step (resume replays).

    ``worker.extras`` may hold ``step_s`` (seconds each step sleeps, a stand-in for real work so
    a time budget is reached) and ``bad_step`` (whose loss raises a user's error)."""

    kind = "line"

    def build_model(self) -> nn.Module:
        return nn.Linear(1, 1)

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        step = start_step
        while True:
            rng = np.random.default_rng([self.job.run.seed, self.worker.rank, step])
            x = torch.from_numpy(rng.uniform(-1, 1, (8, 1)).astype(np.float32))
            yield {"x": x, "y": 2 * x + 1}
            step += 1

    def loss(self, model, batch, step):
        if step == self.worker.extras.get("bad_step"):
            raise ConfigError(f"bad input at step {step}")
        time.sleep(self.worker.extras.get("step_s", 0.0))
        return nn.functional.mse_loss(model(batch["x"]), batch["y"]), {}


def line_job(storage, name: str, **run) -> TrainJob:
    settings = {"name": name, "storage_path": str(storage), "steps": 6, "cpus_per_worker": 1,
                "checkpoint_every": 3, "report_every": 3, "preview_every": 1000, **run}
    return TrainJob(run=RunSettings(**settings), optim={"lr": 0.05, "warmup_steps": 1})


# ---------------------------------------------------------------------- parts of the loop
def test_decay_groups_spare_biases_norms_tokens_and_frozen_weights():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.frozen = nn.Linear(4, 4).requires_grad_(False)

    net = Net()
    decay, no_decay = decay_groups(net, weight_decay=0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert [id(p) for p in decay["params"]] == [id(net.linear.weight)]
    spared = {net.linear.bias, net.norm.weight, net.norm.bias, net.pos_embed, net.cls_token}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in spared}


def test_a_checkpoint_holds_the_model_contract_and_the_state_to_resume(tmp_path):
    job = line_job(tmp_path, "ckpt")
    task = LineTask(job, WorkerInfo(rank=0, world_size=1, device=torch.device("cpu"), extras={}))
    model = task.build_model()
    optimizer = torch.optim.AdamW(task.param_groups(model), lr=job.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(job.optim, 6))
    for step in range(2):
        loss, _ = task.loss(model, next(task.batches(step)), step)
        loss.backward()
        optimizer.step()
        scheduler.step()
    save_checkpoint(tmp_path, task=task, model=model, optimizer=optimizer, scheduler=scheduler,
                    step=2, trained_s=1.5)

    checkpoint = load_model_checkpoint(tmp_path)  # read without the training code
    assert checkpoint["kind"] == "line" and checkpoint["step"] == 2
    assert TrainJob.model_validate_json(checkpoint["job"]) == job
    assert json.loads((tmp_path / "job.json").read_text()) == json.loads(job.model_dump_json())
    for key, value in model.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][key], value)
    state = load_tensors(tmp_path / "train_state.pt")
    assert state["step"] == 2 and state["trained_s"] == 1.5
    assert state["scheduler"]["last_epoch"] == 2
    assert state["optimizer"]["state"][0]["step"] == 2


def test_user_errors_are_found_inside_rays_exception_chain():
    mistake = ConfigError("data.image is missing")
    try:
        raise RuntimeError("worker died") from mistake
    except RuntimeError as wrapped:
        chained = wrapped
    assert _user_error_in(WorkerGroupError("training failed", {0: chained})) is mistake
    assert _user_error_in(WorkerGroupError("training failed", {0: RuntimeError("oom")})) is None


def test_starts_are_read_back_in_order(tmp_path):
    run = RunSettings(name="starts", storage_path=str(tmp_path))
    assert read_starts(run) == []
    lines = [{"start_step": s, "time": 0.0} for s in (0, 3, 8)]
    (tmp_path / "starts").mkdir()
    (tmp_path / "starts" / "starts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_starts(run) == [0, 3, 8]


# ---------------------------------------------------------------------- fit on Ray Train
@pytest.mark.slow
def test_a_users_error_inside_a_worker_comes_out_of_fit_as_itself(ray_session, tmp_path):
    job = line_job(tmp_path, "bad", max_failures=0)
    with pytest.raises(ConfigError, match="bad input at step 1") as raised:
        fit(LineTask, job, extras={"bad_step": 1})
    assert isinstance(raised.value, NeurorayError)


@pytest.mark.slow
def test_a_time_budget_stops_at_a_checkpoint_and_a_rerun_resumes_its_clock(ray_session, tmp_path):
    budget = 0.6
    job = line_job(tmp_path, "budget", steps=10_000, time_budget_s=budget, checkpoint_every=10_000)
    result = fit(LineTask, job, extras={"step_s": 0.05})
    stopped = result.metrics["step"]
    assert 1 < stopped < 10_000  # the budget ended the run, not the steps
    assert result.metrics["trained_s"] >= budget
    checkpoint = load_model_checkpoint(result.checkpoint.path)
    assert checkpoint["step"] == stopped  # the last step was checkpointed
    # the schedule followed time: by steps it would still be at the full lr
    assert warmup_cosine(job.optim, 10_000)(stopped) > 0.99
    assert result.metrics["lr"] < 0.1 * job.optim.lr
    assert read_starts(job.run) == [0]

    # a larger budget on the same run: it resumes at the checkpoint with the clock it stored
    longer = job.run.model_copy(
        update={"time_budget_s": 2 * budget, "checkpoint_every": 2, "keep_checkpoints": 1000}
    )
    resumed = fit(LineTask, job.model_copy(update={"run": longer}), extras={"step_s": 0.05})
    assert read_starts(job.run) == [0, stopped]  # continued from the checkpoint
    assert resumed.metrics["step"] > stopped
    assert resumed.metrics["trained_s"] >= 2 * budget
    reported = [m for _, m in resumed.best_checkpoints if m["step"] > stopped]
    assert reported and min(m["step"] for m in reported) <= stopped + 2
    # from its first step on, the resumed run counted the first run's training time too
    assert all(m["trained_s"] >= budget for m in reported)


def test_a_rerun_that_would_train_something_else_is_refused_before_any_work(ray_session, tmp_path):
    """Same run.name, another learning rate: resuming would pass the old checkpoint off as the
    new job's result, so fit refuses, naming the key; more steps (how long, not what) resume."""
    from neuroray.errors import VolumeError

    job = line_job(tmp_path, "same_name", steps=3, checkpoint_every=3)
    fit(LineTask, job)
    changed = job.model_copy(update={"optim": job.optim.model_copy(update={"lr": 0.01})})
    with pytest.raises(VolumeError, match=r"optim.lr: 0.05 -> 0.01.*another run.name"):
        fit(LineTask, changed)
    assert read_starts(job.run) == [0]  # nothing started
    longer = job.model_copy(update={"run": job.run.model_copy(update={"steps": 4})})
    assert fit(LineTask, longer).metrics["step"] == 4
    assert read_starts(job.run) == [0, 3]
