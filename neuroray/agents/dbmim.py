"""dbMiM: an RLlib masking policy and a Ray Train MIM model, trained side by side.

``neuroray pretrain dbmim configs/pretrain_dbmim.yaml`` runs :func:`run_dbmim`, which starts:

- the chunk servers (one :class:`~neuroray.platform.server.ServerPool`, read by both sides);
- a :class:`~neuroray.agents.weights.WeightStore` actor (no CPU) that carries weights both ways;
- a :class:`~neuroray.agents.oracle.MIMOracle` actor: the latest MIM weights, scoring batches of
  crops for the agents (``rl.oracle``: CPU, or a GPU fraction);
- an :class:`RLRunner` actor holding ``rl.cpus`` CPUs: RLlib PPO over
  :class:`~neuroray.agents.env.MaskingEnv` with one shared
  :class:`~neuroray.agents.module.PatchPolicyModule` (``num_env_runners=0``: it samples in its own
  process, the fastest layout on a few cores); it publishes the policy after every iteration;
- then the MIM run itself: :func:`~neuroray.trainers.loop.fit` with :class:`DbMiMTask`, an MAE
  task whose rank 0 publishes the MAE weights every ``rl.publish_mim_every`` steps and whose
  workers sample masks from the newest policy (random masking at ``masking.ratio`` until the
  first policy arrives).

Why an actor for the RL loop: the driver is blocked in ``fit`` and holds no CPU, while an actor
gets its own process, a CPU reservation Ray accounts for (on 2 cores: one for the trainer, one
for the RL side), its own torch thread count, and on a cluster any node with room. When the MIM
run ends the driver stops the RL loop, which writes a final checkpoint.

**Checkpoints and resume.** The MIM side checkpoints through the shared loop
(``<run dir>/checkpoint_*``, kind ``"dbmim"``). The RL side writes
``<run dir>/rl/checkpoint_<iteration>/`` (``algo.save_to_path``, plus ``rl_state.json`` and
``policy.pt``: the policy net alone, loadable with :func:`load_policy`) every
``rl.checkpoint_every`` iterations and at the end. Rerunning with the same ``run.name`` resumes
both: the trainer from its checkpoint, the RL loop from its newest one (it republishes the restored
policy at once). With a remote ``run.storage_path`` the RL checkpoints stay local
(``runs/<name>/rl``), so resume the RL side on the same machine.

**TensorBoard** (``<run dir>/tensorboard``): ``train/*`` from the MIM loop (losses, mask ratio,
``policy_version``, ``policy_mask_prob``, ``policy_entropy``, and what the coupling costs the
trainer per step: ``policy_ms``, ``publish_ms``) and ``pretrain/mask_probability``
(a slice | the policy's per-patch mask probability | the sampled mask); ``rl/*`` from the RL loop
(``reward_mean``, ``team_loss``, ``mask_ratio``, ``entropy``, ``policy_loss``, ``vf_loss``,
``decisions_per_s``, ``crops_per_s``) and ``rl/mask_probability`` on a fixed probe crop.

**The control.** ``masking.name=random masking.ratio=R`` (e.g. the ratio the policy converged to)
runs the same job as plain MAE with random masking and no RL side: same data, model, steps and
batch size, so it is the matched-compute control for the trainer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from ray.rllib.callbacks.callbacks import RLlibCallback
from torch import nn

from neuroray.agents.env import EnvSettings
from neuroray.agents.module import PolicyConfig
from neuroray.agents.oracle import OracleSettings
from neuroray.agents.weights import numpy_to_state_dict, state_dict_to_numpy
from neuroray.config import StrictModel
from neuroray.errors import NeurorayError
from neuroray.masking import MaskerSpec, PolicyMasker
from neuroray.preview import grid, to_grey
from neuroray.trainers.loop import TrainTask, is_remote
from neuroray.trainers.pretrain import MAETask, PretrainJob, mae_preview, pretrain

log = logging.getLogger(__name__)

MIM_CHANNEL, POLICY_CHANNEL = "mim", "policy"
POLL_INTERVAL_S = 0.2
"""How often a trainer worker asks the weight store for a newer policy (without waiting)."""


class DbMiMError(NeurorayError):
    """The dbMiM run cannot start or continue (resources, checkpoints, RL side failures)."""


# ---------------------------------------------------------------------- config
class PPOSettings(StrictModel):
    """PPO on the new API stack; batch sizes count agent steps (= patch decisions)."""

    lr: float = Field(3e-4, gt=0)
    train_batch_agent_steps: int = Field(4096, ge=1)
    minibatch_size: int = Field(1024, ge=1)
    num_epochs: int = Field(4, ge=1)
    entropy_coeff: float = Field(0.01, ge=0)
    clip_param: float = Field(0.2, gt=0)
    vf_loss_coeff: float = Field(0.5, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)


class RLSettings(StrictModel):
    """The RL side of dbMiM: env, policy, PPO, oracle, resources and exchange cadence."""

    env: EnvSettings = EnvSettings()
    policy: PolicyConfig = PolicyConfig()
    ppo: PPOSettings = PPOSettings()
    oracle: OracleSettings = OracleSettings()
    cpus: float = Field(1.0, gt=0)
    """CPUs reserved for the RL actor (RLlib sampling and learning run in it)."""
    pin_cpus: list[int] | None = None
    """Pin the RL actor and the oracle to these cores (Linux), e.g. to keep them off the
    trainer's core on one machine; None leaves placement to the OS."""
    publish_mim_every: int = Field(10, ge=1)
    """Trainer steps between MIM weight publications (the oracle picks them up)."""
    checkpoint_every: int = Field(10, ge=1)
    """RL iterations between RL checkpoints (one is also written when the run ends)."""
    preview_every: int = Field(10, ge=1)
    max_iterations: int | None = Field(None, ge=1)
    """Stop the RL loop after this many iterations (None: run until the MIM run ends)."""
    steps_per_policy: int | None = Field(None, ge=1)
    """Lockstep mode (the paper's alternating updates): trainer step s waits for policy
    iteration >= s // steps_per_policy, and RL iteration k + 1 waits for the MIM weights of step
    k * steps_per_policy (published then). None (default): each side runs at its own pace."""
    wait_for_mim: bool = True
    """Start training the policy only once the trainer has published its first MIM weights
    (scoring masks with an untrained model teaches nothing, and on a small machine it would slow
    the trainer's start)."""
    augment: bool = True
    """Augment the agents' crops with ``data.augment``, as the trainer's crops are."""
    wait_timeout_s: float = Field(600.0, gt=0)
    """How long one side waits for the other (RL actor placement, lockstep turns) before failing."""
    seed: int = 0


class DbMiMJob(PretrainJob):
    """A dbMiM pretraining job: a :class:`~neuroray.trainers.pretrain.PretrainJob` plus ``rl``.

    ``masking`` is the policy masker (its ``ratio`` is used until the first policy arrives);
    any other masker runs the matched-compute control without the RL side.
    """

    masking: MaskerSpec = PolicyMasker(ratio=0.75)
    rl: RLSettings = RLSettings()

    @model_validator(mode="after")
    def _rl_settings_fit(self) -> DbMiMJob:
        rl = self.rl
        if rl.steps_per_policy and rl.max_iterations:
            needed = -(-self.run.steps // rl.steps_per_policy)
            if rl.max_iterations < needed:
                raise ValueError(
                    f"lockstep needs rl.max_iterations >= run.steps / rl.steps_per_policy = "
                    f"{needed}, got {rl.max_iterations}; raise it or set it to null"
                )
        if self.rl.ppo.minibatch_size > self.rl.ppo.train_batch_agent_steps:
            raise ValueError(
                f"rl.ppo.minibatch_size {self.rl.ppo.minibatch_size} exceeds "
                f"rl.ppo.train_batch_agent_steps {self.rl.ppo.train_batch_agent_steps}"
            )
        return self

    @property
    def uses_policy(self) -> bool:
        return isinstance(self.masking, PolicyMasker)


# ---------------------------------------------------------------------- policy payloads
def policy_payload(net: nn.Module, feature_dim: int, config: PolicyConfig, iteration: int) -> dict:
    """What the RL side publishes: weights and what is needed to rebuild the net."""
    return {
        "state_dict": state_dict_to_numpy(net.state_dict()),
        "feature_dim": int(feature_dim),
        "policy": config.model_dump(),
        "iteration": int(iteration),
    }


def policy_from_payload(payload: dict) -> nn.Module:
    from neuroray.agents.module import build_policy_net

    net = build_policy_net(payload["feature_dim"], payload["policy"])
    net.load_state_dict(numpy_to_state_dict(payload["state_dict"]))
    return net.eval()


def load_policy(path: str | Path) -> nn.Module:
    """The policy net saved in an RL checkpoint (``policy.pt`` or its directory), RLlib-free."""
    from neuroray.agents.module import build_policy_net

    path = Path(path)
    file = path / "policy.pt" if path.is_dir() else path
    if not file.is_file():
        raise DbMiMError(f"no dbMiM policy at {path} (expected policy.pt in an RL checkpoint)")
    saved = torch.load(file, map_location="cpu", weights_only=True)
    net = build_policy_net(saved["feature_dim"], saved["policy"])
    net.load_state_dict(saved["state_dict"])
    return net.eval()


def binary_entropy(probs: np.ndarray | torch.Tensor) -> float:
    """Mean entropy (nats) of independent Bernoulli(p) choices."""
    p = torch.as_tensor(probs, dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
    return float((-(p * p.log() + (1 - p) * (1 - p).log())).mean())


# ---------------------------------------------------------------------- previews
def probability_preview(
    volume: np.ndarray,
    probs: np.ndarray,
    patch_size: Sequence[int],
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Middle z-slice of a crop | its per-patch mask probability (red = likely masked, blue =
    likely kept, over the image) | the sampled mask (hidden patches darkened), as HxWx3 uint8."""
    z = volume.shape[0] // 2
    ones = np.ones(tuple(patch_size), dtype=np.float32)
    voxel_probs = np.kron(np.asarray(probs, dtype=np.float32), ones)[z]
    grey = to_grey(volume[z])  # stretched once, so darkening below stays visible
    heat = np.stack([voxel_probs * 255, np.zeros_like(voxel_probs), (1 - voxel_probs) * 255], -1)
    tinted = (0.5 * grey[..., None] + 0.5 * heat).astype(np.uint8)
    tiles = [grey, tinted]
    if mask is not None:
        voxel_mask = np.kron(np.asarray(mask, dtype=bool), np.ones(tuple(patch_size), bool))[z]
        tiles.append(np.where(voxel_mask, grey // 4, grey).astype(np.uint8))
    return grid(tiles)


# ---------------------------------------------------------------------- trainer side
class DbMiMTask(MAETask):
    """MAE whose masks come from the newest published policy; rank 0 publishes MIM weights."""

    kind = "dbmim"
    job: DbMiMJob

    def __init__(self, job: DbMiMJob, worker: Any) -> None:
        super().__init__(job, worker)
        self.store = worker.extras.get("store")
        self.policy: nn.Module | None = None
        self.policy_version = 0  # RL iterations count from 1; 0 = none yet
        self._poll: Any = None
        self._next_poll = 0.0
        self._publish: Any = None
        self._published_once = False

    # -- weight exchange ----------------------------------------------------------------------
    def poll_policy(self, step: int) -> None:
        """Take a newer policy from the store if one has arrived.

        Asks the store at most every ``POLL_INTERVAL_S`` and never blocks a step, except in
        lockstep mode, where step s waits for policy iteration ``s // rl.steps_per_policy``.
        """
        if self.store is None:
            return
        self._check_store(block=False)
        every = self.job.rl.steps_per_policy
        if every is None or self.policy_version >= step // every:
            return
        required, deadline = step // every, time.monotonic() + self.job.rl.wait_timeout_s
        while self.policy_version < required:
            if time.monotonic() > deadline:
                raise DbMiMError(
                    f"trainer step {step} waited {self.job.rl.wait_timeout_s:.0f} s for policy "
                    f"iteration {required} (has {self.policy_version}): the RL side stopped or "
                    "failed; see the RLRunner log, or unset rl.steps_per_policy"
                )
            self._check_store(block=True)
            if self.policy_version < required:
                time.sleep(0.02)

    def _check_store(self, block: bool) -> None:
        import ray

        now = time.monotonic()
        if self._poll is None:
            if not block and now < self._next_poll:
                return
            self._poll = self.store.get.remote(POLICY_CHANNEL, newer_than=self.policy_version)
            self._next_poll = now + POLL_INTERVAL_S
        ready, _ = ray.wait([self._poll], timeout=None if block else 0)
        if not ready:
            return
        found, self._poll = ray.get(self._poll), None
        if found is not None:
            version, payload = found
            self.policy = policy_from_payload(payload).to(self.worker.device)
            self.policy_version = int(version)

    def publish_mim(self, model: nn.Module, step: int) -> None:
        import ray

        if self._publish is not None:
            ray.get(self._publish)  # at most one publication in flight
        payload = {"state_dict": state_dict_to_numpy(model.state_dict()), "step": step}
        self._publish = self.store.put.remote(MIM_CHANNEL, step, payload)
        self._published_once = True

    # -- masks --------------------------------------------------------------------------------
    def mask_probabilities(self, model: nn.Module, image: torch.Tensor) -> np.ndarray | None:
        """The policy's probability of masking each patch of each crop, [B, Nz, Ny, Nx]."""
        if self.policy is None:
            return None
        from neuroray.agents.oracle import patch_observations

        raw = _unwrap(model)
        with torch.autocast(device_type=image.device.type, enabled=False):  # fp32 probabilities
            obs = patch_observations(raw, image.float(), self.job.rl.oracle.feature_source)
            probs = self.policy.mask_probability(obs).float().cpu().numpy().astype(np.float64)
        return probs.reshape(len(image), *self.token_grid(raw))

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        tick = time.perf_counter()
        self.poll_policy(step)
        probs = self.mask_probabilities(model, batch["image"])
        self.masker.set_source(None if probs is None else (lambda grid, rng: probs))
        coupling_ms = 1000 * (time.perf_counter() - tick)
        loss, scalars = super().loss(model, batch, step)
        scalars["policy_ms"] = coupling_ms  # polling + the policy's forward on this batch
        scalars["policy_version"] = float(self.policy_version)
        # every step logs these (the loop averages over all steps of a window): before the first
        # policy, the random masker's per-patch probability (its ratio) and its entropy
        marginal = probs if probs is not None else np.array([self.masker.ratio])
        scalars["policy_mask_prob"] = float(marginal.mean())
        scalars["policy_entropy"] = binary_entropy(marginal)
        return loss, scalars

    def after_step(self, model: nn.Module, step: int) -> dict[str, float]:
        rl = self.job.rl
        tick = time.perf_counter()
        if self.worker.is_chief and self.store is not None:
            due = step % rl.publish_mim_every == 0
            turn = rl.steps_per_policy is not None and step % rl.steps_per_policy == 0
            if not self._published_once or due or turn:
                self.publish_mim(model, step)
        return {"publish_ms": 1000 * (time.perf_counter() - tick)}  # averaged over steps

    def previews(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, np.ndarray]:
        image = batch["image"][:1]
        probs = self.mask_probabilities(model, image)
        self.masker.set_source(None if probs is None else (lambda grid, rng: probs))
        mask = self.masks(model, 1, step)
        previews = {"pretrain/input_mask_reconstruction": mae_preview(model, image, mask)}
        if probs is not None:
            volume = image[0, 0].float().cpu().numpy()
            patch = _unwrap(model).encoder.patch_size
            previews["pretrain/mask_probability"] = probability_preview(
                volume, probs[0], patch, mask[0]
            )
        return previews


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------- RL side
def build_ppo_config(rl: RLSettings, env_config: dict[str, Any], feature_dim: int) -> Any:
    """PPO over MaskingEnv with one shared PatchPolicyModule, sized for a small machine."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from neuroray.agents.env import MaskingEnv
    from neuroray.agents.module import PatchPolicyModule

    ppo = rl.ppo
    module = RLModuleSpec(
        module_class=PatchPolicyModule,
        model_config={"feature_dim": feature_dim, **rl.policy.model_dump()},
    )
    return (
        PPOConfig()
        .environment(MaskingEnv, env_config=env_config)
        .env_runners(num_env_runners=0, episodes_to_numpy=False)
        .multi_agent(
            policies={"shared"},
            policy_mapping_fn=_shared_policy,
            count_steps_by="agent_steps",
        )
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs={"shared": module}))
        .training(
            train_batch_size_per_learner=ppo.train_batch_agent_steps,
            minibatch_size=ppo.minibatch_size,
            num_epochs=ppo.num_epochs,
            lr=ppo.lr,
            entropy_coeff=ppo.entropy_coeff,
            clip_param=ppo.clip_param,
            vf_loss_coeff=ppo.vf_loss_coeff,
            grad_clip=ppo.grad_clip,
            gamma=0.99,
            lambda_=1.0,
        )
        .callbacks(MaskingMetrics)
        .debugging(seed=rl.seed, log_level="WARN")
    )


def _shared_policy(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    return "shared"


class MaskingMetrics(RLlibCallback):
    """Logs each crop's team loss, mask ratios and mean reward from the env's infos."""

    def on_episode_end(self, *, episode: Any, metrics_logger: Any = None, **kwargs: Any) -> None:
        if metrics_logger is None:
            return
        heads = [a for a in episode.agent_ids if str(a).endswith("_0")]
        for info in episode.get_infos(-1, agent_ids=heads).values():
            for key in ("team_loss", "mask_ratio", "chosen_ratio", "reward_mean"):
                if key in info:
                    metrics_logger.log_value(key, info[key], reduce="mean")
            if "mim_version" in info:
                metrics_logger.log_value("mim_version", info["mim_version"], reduce="max")


def rl_dir(job: DbMiMJob) -> Path:
    """Where the RL side checkpoints: ``<run dir>/rl``; for a remote ``run.storage_path``
    (s3://, gs://) a local ``runs/<name>/rl``, like TensorBoard's fallback."""
    if is_remote(job.run.storage_path):
        return Path("runs") / job.run.name / "rl"
    return Path(job.run.run_dir()) / "rl"


def latest_rl_checkpoint(directory: Path) -> Path | None:
    found = sorted(p for p in directory.glob("checkpoint_*") if (p / "rl_state.json").exists())
    return found[-1] if found else None


def check_rl_checkpoint_unpickled(checkpoint: Path | None) -> None:
    """Refuse an RL checkpoint that ``restore_from_path`` would unpickle: it reads each
    component's ``*state.msgpack``, falling back to a pickled ``*state.pkl``. (RLlib 2.60 also
    pickles ``class_and_ctor_args.pkl``, which only ``Algorithm.from_checkpoint`` reads.)"""
    import importlib.util

    if importlib.util.find_spec("msgpack_numpy") is None:
        raise DbMiMError("dbMiM's RL checkpoints need msgpack-numpy: pip install msgpack-numpy")
    if checkpoint is None:
        return
    pickled = sorted(
        p for p in checkpoint.rglob("*state.pkl") if not p.with_suffix(".msgpack").exists()
    )
    if pickled:
        raise DbMiMError(
            f"RL checkpoint {checkpoint} holds pickled state ({pickled[0].relative_to(checkpoint)}),"
            " which neuroray does not load: delete it (or its rl/ folder) to start the RL side over"
        )


class msgpack_checkpoint_io:  # noqa: N801 (a context manager, used like a function)
    """Around an RLlib msgpack checkpoint read or write: RLlib calls ``msgpack_numpy.patch()``,
    which swaps ``msgpack``'s functions process-wide, and Ray serialises with them, so numpy
    arrays this process sent afterwards would arrive as dicts. Put the originals back."""

    _NAMES = ("Packer", "Unpacker", "load", "loads", "dump", "dumps", "pack", "packb", "unpack",
              "unpackb")  # fmt: skip

    def __enter__(self) -> None:
        import msgpack

        self._saved = {name: getattr(msgpack, name) for name in self._NAMES}

    def __exit__(self, *exc: object) -> None:
        import msgpack

        for name, value in self._saved.items():
            setattr(msgpack, name, value)


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
            "seed": self.job.rl.seed,
        }
        self.probe = crops.sample(1, np.random.default_rng(self.job.rl.seed + 7919))
        return build_ppo_config(self.job.rl, env_config, self.feature_dim).build_algo()

    def _publish(self, algo: Any) -> None:
        import ray

        net = algo.get_module("shared").net
        payload = policy_payload(net, self.feature_dim, self.job.rl.policy, self.iteration)
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
        torch.save(
            {
                "state_dict": net.state_dict(),
                "feature_dim": self.feature_dim,
                "policy": self.job.rl.policy.model_dump(),
                "iteration": self.iteration,
            },
            tmp / "policy.pt",
        )
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

    def _probe_preview(self, algo: Any) -> np.ndarray:
        import ray

        obs = ray.get(self.oracle.observe.remote(self.probe))
        net = algo.get_module("shared").net
        probs = net.mask_probability(torch.tensor(np.asarray(obs))).numpy()
        grid_shape = tuple(
            s // p for s, p in zip(self.probe.shape[1:], self.patch_size, strict=True)
        )
        return probability_preview(self.probe[0], probs[0].reshape(grid_shape), self.patch_size)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
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
                self._publish(algo)
                elapsed = time.perf_counter() - tick
                steps = _agent_steps(result)
                decisions, busy = decisions + steps, busy + elapsed
                scalars = _rl_scalars(result)
                scalars.update(
                    decisions_per_s=steps / max(elapsed, 1e-9),
                    crops_per_s=steps / max(elapsed, 1e-9) / self._patches_per_crop(),
                    iteration_s=elapsed,
                )
                for key, value in scalars.items():
                    writer.add_scalar(f"rl/{key}", value, self.iteration)
                if self.iteration % rl.preview_every == 0 or self.iteration == start_iteration + 1:
                    writer.add_image(
                        "rl/mask_probability",
                        self._probe_preview(algo),
                        self.iteration,
                        dataformats="HWC",
                    )
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
    for key in ("reward_mean", "team_loss", "mask_ratio", "chosen_ratio", "mim_version"):
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


# ---------------------------------------------------------------------- the driver
def run_dbmim(job: DbMiMJob, task_class: type[TrainTask] = DbMiMTask) -> Any:
    """Run a dbMiM job (or its random-masking control); returns the MIM run's Ray Result.

    The RL side's summary (iterations, decisions/s, crops/s, last reward / entropy / ratio, its
    checkpoint) is added to ``result.metrics`` under ``rl/``.
    """
    if not job.uses_policy:
        log.info(
            "masking is %r: running the matched-compute control (plain MAE, no RL side)",
            job.masking.name,
        )
        return pretrain(job, MAETask)

    import ray

    from neuroray.agents.oracle import start_oracle
    from neuroray.agents.weights import start_weight_store
    from neuroray.runtime import connect
    from neuroray.trainers.data import start_pool
    from neuroray.trainers.loop import fit

    connect(job.ray.address, num_cpus=job.ray.num_cpus, object_store_mb=job.ray.object_store_mb)
    pool = start_pool(job.data)
    actors: list[Any] = []
    try:
        store = start_weight_store()
        oracle = start_oracle(
            job.model, job.rl.oracle, seed=job.run.seed, store=store, pin_cpus=job.rl.pin_cpus
        )
        actors += [store, oracle]
        runner = start_rl_runner(job, pool, store, oracle)
        actors.append(runner)
        rl_run = runner.run.remote()
        try:
            result = fit(task_class, job, extras={"pool": pool, "store": store})
        finally:
            runner.stop.remote()
        try:
            summary = ray.get(rl_run)
        except ray.exceptions.RayError as err:
            raise DbMiMError(
                f"the MIM run finished (checkpoint {result.checkpoint}) but the RL side failed: "
                f"{err}; rerun with the same run.name to resume both sides"
            ) from err
        result.metrics.update({f"rl/{k}": v for k, v in summary.items()})
        return result
    finally:
        for actor in actors:
            ray.kill(actor)
        pool.shutdown()


JOB_CLASS = DbMiMJob


def run_job(job: DbMiMJob) -> Any:
    """The CLI's entry point (``neuroray pretrain dbmim``)."""
    return run_dbmim(job)
