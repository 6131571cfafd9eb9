"""WeightStore: the one place dbMiM's two sides swap weights, and the payloads that cross it.

It sits at the trainers layer because both sides use it: the Ray Train task
(:mod:`neuroray.trainers.dbmim`) and the RL side (:mod:`neuroray.agents`), which may import
trainers but not the other way round.

The MIM trainer (Ray Train rank 0) publishes its MAE weights on the ``"mim"`` channel every K
steps; the MIM oracle picks them up before it scores crops. The RL side publishes its policy on
the ``"policy"`` channel (:func:`policy_payload`) after every PPO iteration; every trainer worker
polls it without blocking and samples masks from the newest policy it has
(:func:`policy_from_payload`).

Payloads are plain dicts of numpy arrays and JSON-able metadata (``state_dict_to_numpy``), so they
cross process boundaries through Ray's object store without torch pickling, and large arrays come
back zero-copy. Versions are integers that only grow per channel (the trainer's step, the RL
iteration); a reader asks for anything newer than what it holds and gets ``None`` when there is
nothing new, which keeps polling cheap.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from neuroray.models.policy import PolicyConfig, build_policy_net

Payload = dict[str, Any]
MIM_CHANNEL, POLICY_CHANNEL = "mim", "policy"


class WeightStore:
    """Latest payload per channel. Use :func:`start_weight_store` for the Ray actor."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[int, Payload]] = {}

    def put(self, channel: str, version: int, payload: Payload) -> bool:
        """Store ``payload`` unless a newer version is already there; True if stored."""
        current = self._latest.get(channel)
        if current is not None and current[0] > version:
            return False
        self._latest[channel] = (int(version), payload)
        return True

    def version(self, channel: str) -> int:
        """Newest version on ``channel``, -1 when nothing was published yet."""
        current = self._latest.get(channel)
        return -1 if current is None else current[0]

    def get(self, channel: str, newer_than: int = -1) -> tuple[int, Payload] | None:
        """``(version, payload)`` if the channel holds something newer than ``newer_than``."""
        current = self._latest.get(channel)
        if current is None or current[0] <= newer_than:
            return None
        return current

    def versions(self) -> dict[str, int]:
        return {channel: version for channel, (version, _) in self._latest.items()}


def start_weight_store() -> Any:
    """A WeightStore actor that needs no CPU of its own (it only holds references)."""
    import ray

    return ray.remote(WeightStore).options(num_cpus=0, max_restarts=0).remote()


def state_dict_to_numpy(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torch state dict as CPU float/int numpy arrays (bf16 is widened to float32)."""
    out = {}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[key] = value.numpy().copy()
    return out


def numpy_to_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_dict_to_numpy` (copies: Ray returns read-only arrays)."""
    return {key: torch.from_numpy(np.array(value)) for key, value in arrays.items()}


def policy_payload(
    net: nn.Module, feature_dim: int, config: PolicyConfig, iteration: int, mim_step: int = -1
) -> dict:
    """What the RL side publishes: weights, what is needed to rebuild the net, and ``mim_step``,
    the trainer step of the MIM weights its last iteration was rewarded by (-1: unknown)."""
    return {
        "state_dict": state_dict_to_numpy(net.state_dict()),
        "feature_dim": int(feature_dim),
        "policy": config.model_dump(),
        "iteration": int(iteration),
        "mim_step": int(mim_step),
    }


def policy_from_payload(payload: dict) -> nn.Module:
    net = build_policy_net(payload["feature_dim"], payload["policy"])
    net.load_state_dict(numpy_to_state_dict(payload["state_dict"]))
    return net.eval()
