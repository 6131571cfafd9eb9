"""``loss.png`` beside a run's checkpoints: its training curves, drawn from its TensorBoard events.

The events hold every report of every start of the run (a resumed run keeps its history), and the
RL side of a dbMiM run writes its own under ``tensorboard/rl``; reading them back is what makes
one figure serve every kind of training. Panels appear for the scalars a run has: the loss (and
its components), validation metrics (fine-tuning), and for dbMiM the RL side's reward, the
policy's entropy and the mask ratio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from neuroray.paths import is_remote
from neuroray.trainers.settings import TrainJob

Series = tuple[list[int], list[float]]


@dataclass(frozen=True)
class Panel:
    title: str
    tags: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    needs_policy: bool = False
    """Only for runs with a masking policy (dbMiM): MAE's mask ratio is a constant."""

    def series(self, scalars: Mapping[str, Series]) -> list[str]:
        chosen = [t for t in self.tags if t in scalars]
        if self.prefixes:
            chosen += sorted(
                t
                for t in scalars
                if t.startswith(self.prefixes) and t not in chosen and t not in self.exclude
            )
        return chosen


PANELS = (
    Panel("loss", tags=("train/loss",), prefixes=("train/loss_",)),
    Panel("validation", prefixes=("train/val_",), exclude=("train/val_threshold",)),
    Panel("RL reward", tags=("rl/reward_mean",)),
    Panel("policy entropy", tags=("train/policy_entropy", "rl/entropy")),
    Panel("mask ratio", tags=("train/mask_ratio", "rl/mask_ratio"), needs_policy=True),
)


def read_scalars(directory: str | Path) -> dict[str, Series]:
    """Every scalar under ``directory`` (all event files, sub-runs such as ``rl/`` included) as
    ``tag -> (steps, values)``, sorted by step; a step logged twice (a resumed run) keeps the
    later value."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    directory = Path(directory)
    if not directory.is_dir():
        return {}
    events = EventMultiplexer(size_guidance={"scalars": 0})  # 0: keep every point
    events.AddRunsFromDirectory(str(directory))
    events.Reload()
    merged: dict[str, dict[int, tuple[float, float]]] = {}
    for run in events.Runs():
        for tag in events.GetAccumulator(run).Tags().get("scalars", []):
            points = merged.setdefault(tag, {})
            for event in events.Scalars(run, tag):
                seen = points.get(event.step)
                if seen is None or event.wall_time >= seen[0]:
                    points[event.step] = (event.wall_time, event.value)
    return {
        tag: ([s for s in sorted(points)], [points[s][1] for s in sorted(points)])
        for tag, points in merged.items()
    }


def plot_curves(scalars: Mapping[str, Series], path: str | Path, title: str = "") -> Path | None:
    """Draw the panels that ``scalars`` has data for into ``path`` (PNG); None when none has."""
    from matplotlib.figure import Figure

    has_policy = any(t.startswith(("rl/", "train/policy_")) for t in scalars)
    panels = [
        (panel, panel.series(scalars)) for panel in PANELS if not panel.needs_policy or has_policy
    ]
    panels = [(panel, tags) for panel, tags in panels if tags]
    if not panels:
        return None
    figure = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, tags) in zip(axes, panels, strict=True):
        for tag in tags:
            steps, values = scalars[tag]
            ax.plot(steps, values, label=_label(tag), marker="." if len(steps) < 30 else None)
        ax.set_title(panel.title)
        ax.set_xlabel(_x_label(tags))
        ax.grid(alpha=0.3)
        if len(tags) > 1:
            ax.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _label(tag: str) -> str:
    side, _, name = tag.partition("/")
    return f"{name} ({'RL side' if side == 'rl' else 'trainer'})"


def _x_label(tags: Sequence[str]) -> str:
    sides = {tag.split("/", 1)[0] for tag in tags}
    if sides == {"rl"}:
        return "RL iteration"
    if "rl" in sides:
        return "trainer step / RL iteration"
    return "step"


def curves_path(job: TrainJob) -> Path:
    """``<run dir>/loss.png`` for local runs; beside the local TensorBoard folder otherwise."""
    if is_remote(job.run.storage_path):
        return job.run.tensorboard_path().parent / "loss.png"
    return Path(job.run.run_dir()) / "loss.png"


def write_curves(job: TrainJob) -> Path | None:
    """Redraw ``loss.png`` for ``job``'s run from its TensorBoard events (None: nothing logged)."""
    scalars = read_scalars(job.run.tensorboard_path())
    return plot_curves(scalars, curves_path(job), title=f"run {job.run.name}")
