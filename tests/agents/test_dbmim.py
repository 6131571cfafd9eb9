"""dbMiM orchestration: job config and control, the trainer side of the weight exchange, and an
end-to-end run (RLlib PPO beside Ray Train) on the FIB-SEM cube (synthetic EM without
../shared), with resume."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuroray.agents.dbmim import DbMiMJob, DbMiMTask, run_dbmim
from neuroray.agents.env import ArrayCrops
from neuroray.agents.policy_io import load_policy
from neuroray.config import load_config, validate
from neuroray.errors import ConfigError
from neuroray.masking import HeuristicMasker, PolicyMasker, RandomMasker
from neuroray.models.checkpoint import load_model_checkpoint
from neuroray.models.policy import PolicyConfig, build_policy_net, patch_stats
from neuroray.platform.volume import open_volume
from neuroray.trainers.loop import WorkerInfo, read_starts
from neuroray.trainers.weights import (
    MIM_CHANNEL,
    POLICY_CHANNEL,
    policy_payload,
    start_weight_store,
)

REPO = Path(__file__).resolve().parents[2]
CROP, PATCH, WIDTH, N = (8, 64, 64), (4, 16, 16), 32, 32


def tiny_job(image: str, storage: str = "runs", steps: int = 24, **rl) -> dict:
    return {
        "data": {
            "image": image,
            "num_servers": 1,
            "cache_mb": 64,
            "sampler": {"crop_shape": list(CROP), "roi": [0, 0, 0, 64, 128, 128]},
            "augment": [],
        },
        "model": {
            "encoder": {
                "size": None,
                "width": WIDTH,
                "depth": 1,
                "heads": 2,
                "patch_size": list(PATCH),
                "img_size": list(CROP),
            },
            "decoder_width": 32,
            "decoder_depth": 1,
            "decoder_heads": 2,
            "norm_pix_loss": False,
        },
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "run": {
            "name": "dbmim_e2e",
            "storage_path": storage,
            "steps": steps,
            "batch_size": 4,
            "steps_per_epoch": 20,
            "checkpoint_every": 12,
            "report_every": 4,
            "preview_every": 12,
        },
        "rl": {
            "env": {"crops_per_episode": 4, "reward": {"kind": "rank"}},
            "ppo": {"train_batch_agent_steps": 512, "minibatch_size": 256, "num_epochs": 2},
            "publish_mim_every": 4,
            "checkpoint_every": 2,
            "preview_every": 2,
            **rl,
        },
    }


@pytest.fixture(scope="module")
def em_url(em_raw) -> str:
    """The unlabelled FIB-SEM cube, or a synthetic EM cube (jobs crop inside 64 x 128 x 128)."""
    return em_raw.raw


# ---------------------------------------------------------------------- config
def test_example_config_loads_and_the_random_override_is_the_control():
    job = load_config(DbMiMJob, REPO / "configs" / "pretrain_dbmim.yaml")
    assert job.uses_policy and isinstance(job.masking, PolicyMasker)
    assert DbMiMJob.model_validate_json(job.model_dump_json()) == job

    # the shipped game: fixed count K, rank reward, alpha 0 -> 0.5, lock-step cadence
    assert job.rl.env.count == "fixed" and job.rl.env.reward.kind == "rank"
    assert (job.rl.env.alpha.start, job.rl.env.alpha.end) == (0.0, 0.5)
    assert job.rl.steps_per_policy is not None and job.rl.oracle.reward_target == "floored"

    control = load_config(
        DbMiMJob, REPO / "configs" / "pretrain_dbmim.yaml", ["masking.name=random"]
    )
    assert not control.uses_policy
    assert control.masking == RandomMasker(ratio=job.masking.ratio)  # the same K
    assert control.model == job.model and control.run.steps == job.run.steps
    emergent = load_config(
        DbMiMJob, REPO / "configs" / "pretrain_dbmim.yaml", ["rl.env.reward.kind=emergent"]
    )
    assert emergent.rl.env.count == "emergent"
    # the other controls by name, at the same K and alpha schedule
    heuristic = load_config(
        DbMiMJob, REPO / "configs" / "pretrain_dbmim.yaml", ["masking.name=heuristic"]
    )
    assert heuristic.masking == HeuristicMasker(ratio=job.masking.ratio)
    assert not heuristic.uses_policy and heuristic.uses_content  # no RL side, reads the crops
    inverted = load_config(
        DbMiMJob, REPO / "configs" / "pretrain_dbmim.yaml", ["masking.invert=true"]
    )
    assert inverted.uses_policy and inverted.masking.invert


def test_the_cli_lists_dbmim():
    from neuroray.cli import pretrain_methods

    assert "dbmim" in pretrain_methods()


def test_impossible_rl_settings_fail_before_any_work():
    bad_lockstep = tiny_job("x.h5#raw", steps=40, steps_per_policy=4, max_iterations=5)
    with pytest.raises(ConfigError, match="max_iterations"):
        validate(DbMiMJob, bad_lockstep)
    bad_batch = tiny_job("x.h5#raw")
    bad_batch["rl"]["ppo"]["minibatch_size"] = 1024
    with pytest.raises(ConfigError, match="minibatch_size"):
        validate(DbMiMJob, bad_batch)


# ---------------------------------------------------------------------- trainer side
def test_trainer_samples_masks_from_the_published_policy_and_publishes_its_weights(
    ray_session, em_url
):
    torch.set_num_threads(1)
    job = validate(DbMiMJob, tiny_job(em_url))
    store = start_weight_store()
    worker = WorkerInfo(rank=0, world_size=1, device=torch.device("cpu"), extras={"store": store})
    task = DbMiMTask(job, worker)
    torch.manual_seed(0)
    model = task.build_model()
    volume = np.asarray(open_volume(em_url)[0:32, 0:128, 0:128])
    crops = ArrayCrops(volume, CROP).sample(8, np.random.default_rng(0))
    batch = {"image": torch.from_numpy(crops)[:, None]}

    _, scalars = task.loss(model, batch, 0)
    assert scalars["policy_version"] == 0
    assert scalars["mask_ratio"] == pytest.approx(0.75)  # random masking until a policy arrives
    assert scalars["policy_mask_prob"] == pytest.approx(0.75)
    assert scalars["mask_from_nominations"] == 0 and scalars["alpha"] == 0

    config = PolicyConfig(initial_mask_prob=0.1)
    torch.manual_seed(1)
    net = build_policy_net(WIDTH, config)
    payload = policy_payload(net, WIDTH, config, 3, mim_step=1)
    ray_session.get(store.put.remote(POLICY_CHANNEL, 3, payload))
    step, deadline = 0, time.monotonic() + 30
    while scalars["policy_version"] != 3 and time.monotonic() < deadline:
        step += 1  # polling never blocks a step: the policy shows up a few steps later
        _, scalars = task.loss(model, batch, step)
    assert scalars["policy_version"] == 3
    assert scalars["policy_mask_prob"] == pytest.approx(0.1, abs=0.03)
    assert scalars["policy_prob_sd"] < 0.05  # a fresh policy treats every patch alike
    # the fixed-count rule: exactly K = 24 of 32 per crop, whatever the policy's nomination
    # rate; the nominees (~3 per crop) supply at most round(alpha K) of them
    assert scalars["mask_ratio"] == 0.75
    alpha = 0.5 * step / job.run.steps
    assert scalars["alpha"] == pytest.approx(alpha)
    assert scalars["mask_from_nominations"] <= round(alpha * 24) / 24
    assert scalars["policy_lag_steps"] == step - 1  # trained against the MIM weights of step 1
    task.use_policy(np.ones((8, 2, 4, 4)), job.run.steps)  # every patch nominated, alpha 0.5
    mask = task.masks(model, 8, step)
    assert (mask.reshape(8, -1).sum(1) == 24).all()
    assert task.policy_masker.last_stats["from_nominations"] == pytest.approx(12 / 24)
    # the inverted control nominates by 1 - p: ~90% of the patches under this policy
    job.masking.invert = True
    task.use_policy(task.mask_probabilities(model, batch["image"]), step)
    task.masks(model, 8, step)
    assert task.policy_masker.last_stats["nominated"] == pytest.approx(0.9, abs=0.06)
    job.masking.invert = False
    previews = task.previews(model, batch, step)
    image = previews["pretrain/mask_probability"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3

    task.after_step(model, 1)  # the first step after a (re)start always publishes
    task.after_step(model, 2)
    assert ray_session.get(store.version.remote(MIM_CHANNEL)) == 1
    task.after_step(model, 4)  # rl.publish_mim_every = 4
    version, payload = ray_session.get(store.get.remote(MIM_CHANNEL))
    assert version == 4
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(payload["state_dict"][key], value.numpy())
    ray_session.kill(store)


def test_heuristic_control_masks_the_top_gradient_energy_patches_at_the_same_k(em_url):
    torch.set_num_threads(1)
    settings = tiny_job(em_url)
    settings["masking"] = {"name": "heuristic"}
    job = validate(DbMiMJob, settings)
    worker = WorkerInfo(rank=0, world_size=1, device=torch.device("cpu"), extras={})
    task = DbMiMTask(job, worker)
    torch.manual_seed(0)
    model = task.build_model()
    volume = np.asarray(open_volume(em_url)[0:32, 0:128, 0:128])
    image = torch.from_numpy(ArrayCrops(volume, CROP).sample(8, np.random.default_rng(1)))[:, None]
    energy = patch_stats(image, PATCH)[..., 2].numpy()
    top = np.argsort(-energy, axis=1)[:, :12]  # round(0.5 K) at the end of the alpha schedule
    for step, chosen in ((0, 0), (job.run.steps // 2, 6), (job.run.steps, 12)):
        _, scalars = task.loss(model, {"image": image}, step)
        mask = task.masks(model, 8, step).reshape(8, -1)
        assert (mask.sum(1) == 24).all() and scalars["mask_ratio"] == 0.75
        assert scalars["mask_from_nominations"] == pytest.approx(chosen / 24)
        assert "policy_version" not in scalars  # no policy, no RL side
    assert np.take_along_axis(mask, top, axis=1).all()  # the 12 most textured patches, always


# ---------------------------------------------------------------------- end to end
def _scalars(directory: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for file in sorted(directory.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(file), size_guidance={"scalars": 0}).Reload()
        if tag in events.Tags()["scalars"]:
            values += [e.value for e in events.Scalars(tag)]
    return values


def _images(directory: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for file in directory.glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(file)).Reload().Tags()["images"])
    return tags


def test_dbmim_end_to_end_on_em_both_sides_learn_checkpoint_and_resume(
    ray_session, em_url, tmp_path
):
    # lockstep (the paper's alternating updates) makes the pace independent of machine load:
    # trainer step s uses policy iteration >= s // 4
    settings = tiny_job(em_url, str(tmp_path), steps=24, steps_per_policy=4)
    job = validate(DbMiMJob, settings)
    result = run_dbmim(job)

    checkpoint = load_model_checkpoint(result.checkpoint.path)
    assert checkpoint["kind"] == "dbmim" and checkpoint["step"] == 24
    metrics = result.metrics
    assert metrics["rl/iterations"] >= 5
    assert metrics["policy_version"] >= 5  # the trainer masked with recent policies
    assert metrics["rl/policy_change"] > 1e-3  # the policy's weights moved
    assert 0 < metrics["rl/decisions_per_s"] and 0 < metrics["rl/crops_per_s"]
    assert metrics["mask_ratio"] == 0.75  # exactly K in every crop of the window
    for key in ("within_crop_sd", "spearman_heldout_loss", "spearman_position"):
        assert np.isfinite(metrics[f"rl/diag_{key}"]), key  # diagnostics of the final policy

    tensorboard = job.run.tensorboard_path()
    losses = _scalars(tensorboard, "train/loss")
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]  # the MIM loss falls
    assert "pretrain/mask_probability" in _images(tensorboard)
    for tag in ("rl/reward_mean", "rl/entropy", "rl/mask_ratio", "rl/team_loss"):
        assert _scalars(tensorboard / "rl", tag), tag
    for tag in ("rl/from_nominations", "rl/nominee_rank", "rl/alpha", "rl/diag_within_crop_sd"):
        assert _scalars(tensorboard / "rl", tag), tag
    assert set(_scalars(tensorboard / "rl", "rl/mask_ratio")) == {0.75}
    assert "rl/mask_probability" in _images(tensorboard / "rl")
    alphas = _scalars(tensorboard, "train/alpha")
    assert alphas == sorted(alphas) and 0 < alphas[-1] <= 0.5  # alpha rises with the steps
    assert _scalars(tensorboard, "train/mask_from_nominations")
    # lock-step cadence 4: the policy is never more than ~2 turns behind the MIM model
    lags = _scalars(tensorboard, "train/policy_lag_steps")
    print(
        "policy lag (trainer steps):",
        lags,
        "mim lag:",
        _scalars(tensorboard / "rl", "rl/mim_lag_steps"),
    )
    assert lags and max(lags) <= 8
    assert max(_scalars(tensorboard / "rl", "rl/mim_lag_steps")) <= 8
    # loss.png beside the checkpoints: loss, RL reward, policy entropy, mask ratio (420 px each)
    curves = Image.open(Path(job.run.run_dir()) / "loss.png")
    assert round(curves.width / 420) == 4

    first_rl = Path(metrics["rl/checkpoint"])
    assert (first_rl / "rl_state.json").exists() and (first_rl / "policy.pt").exists()
    saved_policy = torch.cat([p.detach().flatten() for p in load_policy(first_rl).parameters()])

    # rerun with the same name and more steps: both sides resume
    resumed_job = validate(DbMiMJob, {**settings, "run": {**settings["run"], "steps": 32}})
    resumed = run_dbmim(resumed_job)
    assert read_starts(resumed_job.run) == [0, 24]
    assert load_model_checkpoint(resumed.checkpoint.path)["step"] == 32
    summary = resumed.metrics
    assert summary["rl/restored_from"] == str(first_rl)
    assert summary["rl/iterations"] > metrics["rl/iterations"]
    # the RL side continued from the saved policy, not from a fresh one
    after = torch.cat(
        [p.detach().flatten() for p in load_policy(summary["rl/checkpoint"]).parameters()]
    )
    change = float((after - saved_policy).norm() / saved_policy.norm())
    assert change == pytest.approx(summary["rl/policy_change"], rel=1e-3)


def test_heuristic_control_runs_by_name_without_the_rl_side(ray_session, em_url, tmp_path):
    settings = tiny_job(em_url, str(tmp_path), steps=8)
    settings["masking"] = {"name": "heuristic"}
    settings["run"].update(name="dbmim_heuristic", checkpoint_every=8, report_every=4)
    job = validate(DbMiMJob, settings)
    result = run_dbmim(job)
    assert load_model_checkpoint(result.checkpoint.path)["step"] == 8
    assert not any(key.startswith("rl/") for key in result.metrics)  # no RL side ran
    assert result.metrics["mask_ratio"] == 0.75
    assert result.metrics["mask_from_nominations"] > 0  # alpha > 0 in the second window
    assert not (Path(job.run.run_dir()) / "rl").exists()
