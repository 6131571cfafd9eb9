"""The RL loop of a dbMiM run as a Ray actor: PPO iterations, policy publication, RL checkpoints,
TensorBoard (``rl/*``), placement diagnostics (:mod:`neuroray.agents.diagnostics`), and the
lock-step turns with the trainer."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroray.agents.config import DbMiMJob
from neuroray.agents.diagnostics import placement_diagnostics
from neuroray.agents.policy_io import (
    check_rl_checkpoint_unpickled,
    latest_rl_checkpoint,
    msgpack_checkpoint_io,
    rl_dir,
    save_policy,
)
from neuroray.agents.ppo import EPISODE_MEANS, build_ppo_config
from neuroray.masking import RandomMasker
from neuroray.models.policy import ObsLayout
from neuroray.trainers.dbmim import DbMiMError, probability_preview
from neuroray.trainers.weights import MIM_CHANNEL, POLICY_CHANNEL, policy_payload


class RLRunner:
    """The RL loop of a dbMiM run, as a Ray actor (see :func:`start_rl_runner`).

    ``run()`` trains PPO until ``stop()`` is called or ``rl.max_iterations`` is reached,
    publishing the policy after every iteration; it returns a summary. ``crops`` overrides the
    crop source (default: the trainer's ServerPool).
    """

    def __init__(
        self, job_json: str, pool: Any, store: Any, oracle: Any, crops: Any = None
    ) -> None:
        self.job = DbMiMJob.model_validate_json(job_json)
        rl = self.job.rl
        if rl.pin_cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(rl.pin_cpus))
        torch.set_num_threads(max(1, int(rl.cpus)))
        self.pool, self.store, self.oracle = pool, store, oracle
        self.crops = crops
        self._stop = threading.Event()
        self.iteration = 0
        self.summary: dict[str, Any] = {"iterations": 0}

    def ready(self) -> bool:
        return True

    def stop(self) -> None:
        self._stop.set()

    def progress(self) -> dict[str, Any]:
        return dict(self.summary)

    # -- pieces -------------------------------------------------------------------------------
    def _crop_source(self) -> Any:
        if self.crops is not None:
            return self.crops
        from neuroray.agents.env import PoolCrops
        from neuroray.platform.augment import build_pipeline
        from neuroray.platform.sampler import build_sampler

        data = self.job.data
        augment = build_pipeline(data.augment) if (data.augment and self.job.rl.augment) else None
        return PoolCrops(self.pool, build_sampler(self.pool, data.sampler), augment)

    def _build(self) -> Any:
        import ray

        info = ray.get(self.oracle.describe.remote())
        self.feature_dim = int(info["feature_dim"])
        self.patch_size = tuple(info["patch_size"])
        crops = self._crop_source()
        env_config = {
            "oracle": self.oracle,
            "crops": crops,
            "settings": self.job.rl.env.model_dump(),
            "ratio": self.job.masking.ratio,
            "total_steps": self.job.run.steps,
            "seed": self.job.rl.seed,
        }
        rng = np.random.default_rng(self.job.rl.seed + 7919)
        self.probe = crops.sample(self.job.rl.probe_crops, rng)
        grid = (len(self.probe), *info["grid"])
        self.probe_masks = RandomMasker(ratio=self.job.masking.ratio).mask(grid, rng)
        return build_ppo_config(self.job.rl, env_config, self.feature_dim).build_algo()

    def _publish(self, algo: Any, mim_step: int = -1) -> None:
        import ray

        net = algo.get_module("shared").net
        payload = policy_payload(
            net, self.feature_dim, self.job.rl.policy, self.iteration, mim_step=mim_step
        )
        ray.get(self.store.put.remote(POLICY_CHANNEL, self.iteration, payload))

    def _save(self, algo: Any, directory: Path) -> Path:
        """Write ``checkpoint_<iteration>`` atomically (temp dir, then rename) and prune."""
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"checkpoint_{self.iteration:06d}"
        tmp = directory / f".tmp_checkpoint_{self.iteration:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        with msgpack_checkpoint_io():
            algo.save_to_path(str(tmp), use_msgpack=True)  # state as msgpack, not pickle
        net = algo.get_module("shared").net
        save_policy(net, self.feature_dim, self.job.rl.policy, self.iteration, tmp / "policy.pt")
        state = {"iteration": self.iteration, "time": time.time(), "summary": self.summary}
        (tmp / "rl_state.json").write_text(json.dumps(state, default=float))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        keep = self.job.run.keep_checkpoints
        done = sorted(p for p in directory.glob("checkpoint_*") if (p / "rl_state.json").exists())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _restore(self, algo: Any, directory: Path) -> None:
        latest = latest_rl_checkpoint(directory)
        check_rl_checkpoint_unpickled(latest)  # (and msgpack-numpy present before any save)
        if latest is None:
            return
        with msgpack_checkpoint_io():
            algo.restore_from_path(str(latest))
        state = json.loads((latest / "rl_state.json").read_text())
        self.iteration = int(state["iteration"])
        self.summary["restored_from"] = str(latest)
        self._publish(algo)

    def _probe(self, algo: Any) -> tuple[np.ndarray, dict[str, float]]:
        """The preview of the first probe crop and the placement diagnostics of all of them."""
        import ray

        obs = np.asarray(ray.get(self.oracle.observe.remote(self.probe)))
        scored = ray.get(self.oracle.score.remote(self.probe, self.probe_masks))
        net = algo.get_module("shared").net
        probs = net.mask_probability(torch.tensor(obs)).numpy()
        grid_shape = self.probe_masks.shape[1:]
        energy = obs[..., ObsLayout(self.feature_dim).stats][..., 2]  # log gradient energy
        diagnostics = placement_diagnostics(
            probs, scored["per_patch"], self.probe_masks.reshape(len(probs), -1), energy
        )
        preview = probability_preview(
            self.probe[0], probs[0].reshape(grid_shape), self.patch_size, self.probe_masks[0]
        )
        return preview, diagnostics

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import ray
        from torch.utils.tensorboard import SummaryWriter

        rl, job = self.job.rl, self.job
        algo = self._build()
        directory = rl_dir(job)
        self._restore(algo, directory)
        writer = SummaryWriter(str(job.run.tensorboard_path() / "rl"))
        start_iteration, saved_at = self.iteration, self.iteration
        initial = _flat_weights(algo.get_module("shared").net)
        try:
            decisions, busy = 0, 0.0  # busy: time in iterations (waits for the trainer excluded)
            while not self._stop.is_set():
                if rl.max_iterations is not None and self.iteration >= rl.max_iterations:
                    break
                if not self._wait_for_mim(self._mim_needed()):
                    break
                tick = time.perf_counter()
                result = algo.train()
                self.iteration += 1
                scalars = _rl_scalars(result)
                mim_step = int(scalars.get("mim_version", -1))
                self._publish(algo, mim_step)
                elapsed = time.perf_counter() - tick
                steps = _agent_steps(result)
                decisions, busy = decisions + steps, busy + elapsed
                scalars.update(
                    decisions_per_s=steps / max(elapsed, 1e-9),
                    crops_per_s=steps / max(elapsed, 1e-9) / self._patches_per_crop(),
                    iteration_s=elapsed,
                )
                if mim_step >= 0:  # how far the trainer has moved past the weights scored with
                    published = ray.get(self.store.version.remote(MIM_CHANNEL))
                    scalars["mim_lag_steps"] = float(max(0, published - mim_step))
                if self.iteration % rl.preview_every == 0 or self.iteration == start_iteration + 1:
                    preview, diagnostics = self._probe(algo)
                    writer.add_image(
                        "rl/mask_probability", preview, self.iteration, dataformats="HWC"
                    )
                    scalars.update({f"diag_{k}": v for k, v in diagnostics.items()})
                for key, value in scalars.items():
                    writer.add_scalar(f"rl/{key}", value, self.iteration)
                self.summary.update(
                    scalars,
                    iterations=self.iteration,
                    iterations_this_start=self.iteration - start_iteration,
                    decisions=decisions,
                    mean_decisions_per_s=decisions / max(busy, 1e-9),
                    mean_crops_per_s=decisions / max(busy, 1e-9) / self._patches_per_crop(),
                    policy_change=_relative_change(
                        initial, _flat_weights(algo.get_module("shared").net)
                    ),
                )
                writer.flush()
                if self.iteration % rl.checkpoint_every == 0:
                    self._save(algo, directory)
                    saved_at = self.iteration
            if self.iteration > start_iteration:  # the final policy's diagnostics
                _, diagnostics = self._probe(algo)
                for key, value in diagnostics.items():
                    self.summary[f"diag_{key}"] = value
                    writer.add_scalar(f"rl/diag_{key}", value, self.iteration)
            if self.iteration > saved_at or latest_rl_checkpoint(directory) is None:
                self._save(algo, directory)
            self.summary["checkpoint"] = str(latest_rl_checkpoint(directory))
            return dict(self.summary)
        finally:
            writer.close()
            algo.stop()

    def _mim_needed(self) -> int:
        """MIM version (trainer step) the next iteration needs: lockstep turn, or the first."""
        rl = self.job.rl
        first = 1 if rl.wait_for_mim else 0
        if rl.steps_per_policy is not None:
            return max(first, self.iteration * rl.steps_per_policy)
        return first

    def _wait_for_mim(self, version: int) -> bool:
        """Wait until the trainer has published ``version``; False if stopped meanwhile."""
        import ray

        deadline = time.monotonic() + self.job.rl.wait_timeout_s
        while not self._stop.is_set():
            if version <= 0 or ray.get(self.store.version.remote(MIM_CHANNEL)) >= version:
                return True
            if time.monotonic() > deadline:
                raise DbMiMError(
                    f"RL iteration {self.iteration + 1} waited {self.job.rl.wait_timeout_s:.0f} s "
                    f"for the trainer's MIM weights of step {version}: the trainer stopped or "
                    "failed"
                )
            self._stop.wait(0.05)
        return False

    def _patches_per_crop(self) -> int:
        crop = self.job.data.sampler.crop_shape
        return int(np.prod([c // p for c, p in zip(crop, self.patch_size, strict=True)]))


def _flat_weights(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float().clone() for p in net.parameters()])


def _relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """||after - before|| / ||before||: how far the policy has moved since this start."""
    return float((after - before).norm() / before.norm().clamp(min=1e-12))


def _agent_steps(result: dict[str, Any]) -> int:
    sampled = result.get("env_runners", {}).get("num_agent_steps_sampled", 0)
    if isinstance(sampled, dict):
        return int(sum(sampled.values()))
    return int(sampled)


def _rl_scalars(result: dict[str, Any]) -> dict[str, float]:
    runners = result.get("env_runners", {})
    learner = result.get("learners", {}).get("shared", {})
    scalars = {}
    for key in (*EPISODE_MEANS, "mim_version"):
        if key in runners:
            scalars[key] = float(runners[key])
    for key in ("entropy", "policy_loss", "vf_loss", "vf_explained_var", "mean_kl_loss"):
        if key in learner:
            scalars[key] = float(learner[key])
    return scalars


def start_rl_runner(job: DbMiMJob, pool: Any, store: Any, oracle: Any, crops: Any = None) -> Any:
    """The RLRunner actor, with ``rl.cpus`` reserved; waits until it and the oracle are up."""
    import ray

    actor = (
        ray.remote(RLRunner)
        .options(num_cpus=job.rl.cpus, max_concurrency=4, max_restarts=0)
        .remote(job.model_dump_json(), pool, store, oracle, crops)
    )
    waiting = [actor.ready.remote(), oracle.describe.remote()]  # both start in parallel
    ready, _ = ray.wait(waiting, num_returns=2, timeout=job.rl.wait_timeout_s)
    if len(ready) < 2:
        ray.kill(actor)
        raise DbMiMError(
            f"the RL side could not start within {job.rl.wait_timeout_s:.0f} s: the RL actor "
            f"needs rl.cpus={job.rl.cpus} and the oracle rl.oracle.num_cpus="
            f"{job.rl.oracle.num_cpus} / num_gpus={job.rl.oracle.num_gpus} free beside the "
            "trainer's run.num_workers x run.cpus_per_worker; lower them or add resources"
        )
    ray.get(ready)  # surfaces a constructor error
    return actor
