"""The RL side's checkpoints on disk, and the policy net in them.

``<run dir>/rl/checkpoint_<iteration>/`` holds RLlib's state (``algo.save_to_path``, msgpack,
never pickle), ``rl_state.json`` and ``policy.pt``: the policy net alone (:func:`save_policy`),
loadable without RLlib by :func:`load_policy`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from neuroray.agents.config import DbMiMJob
from neuroray.models.policy import PolicyConfig, build_policy_net
from neuroray.paths import is_remote
from neuroray.trainers.dbmim import DbMiMError


def save_policy(
    net: nn.Module, feature_dim: int, config: PolicyConfig, iteration: int, file: Path
) -> None:
    """Write the policy net and what rebuilds it to ``file`` (an RL checkpoint's policy.pt)."""
    torch.save(
        {
            "state_dict": net.state_dict(),
            "feature_dim": feature_dim,
            "policy": config.model_dump(),
            "iteration": iteration,
        },
        file,
    )


def load_policy(path: str | Path) -> nn.Module:
    """The policy net saved in an RL checkpoint (``policy.pt`` or its directory), RLlib-free."""
    path = Path(path)
    file = path / "policy.pt" if path.is_dir() else path
    if not file.is_file():
        raise DbMiMError(f"no dbMiM policy at {path} (expected policy.pt in an RL checkpoint)")
    saved = torch.load(file, map_location="cpu", weights_only=True)
    net = build_policy_net(saved["feature_dim"], saved["policy"])
    net.load_state_dict(saved["state_dict"])
    return net.eval()


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
