"""What a sweep reports: one summary per trial, the best trial, and the printed table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroray.errors import NeurorayError


class SweepError(NeurorayError):
    """A sweep cannot start or finish (its experiment folder clashes, no trial produced a metric)."""


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str
    last_step: int | None
    value: float | None
    """The sweep metric at the trial's last validation."""
    stopped_early: bool
    error: str | None = None
    starts: list[int] = field(default_factory=list)
    """The step each start of its Train run began at ([0, s] = one recovery from step s)."""


@dataclass
class SweepResult:
    name: str
    experiment_path: str
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary
    best_config: Path
    max_concurrent_trials: int

    def summary(self) -> str:
        lines = [
            f"sweep {self.name}: {len(self.trials)} trials, metric {self.metric} ({self.mode}), "
            f"up to {self.max_concurrent_trials} at once; experiment at {self.experiment_path}"
        ]
        for trial in self.trials:
            value = "-" if trial.value is None else f"{trial.value:.4f}"
            note = " stopped early" if trial.stopped_early else ""
            note += f" resumed at {trial.starts[1:]}" if len(trial.starts) > 1 else ""
            note += f" ERROR {trial.error}" if trial.error else ""
            lines.append(
                f"  {trial.trial_id}: {trial.status} step {trial.last_step} "
                f"{self.metric} {value}{note}  {json.dumps(trial.params)}"
            )
        lines.append(
            f"best: {self.best.trial_id} ({self.metric} {self.best.value:.4f}); ready-to-run "
            f"job: {self.best_config}"
        )
        return "\n".join(lines)


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary:
    """ASHA's answer: among trials that got furthest, the best metric at their last validation."""
    scored = [t for t in trials if t.value is not None and t.last_step is not None]
    if not scored:
        raise SweepError("no trial reported its validation metric; see the trials' errors")
    furthest = max(t.last_step for t in scored)
    finalists = [t for t in scored if t.last_step == furthest]
    sign = 1.0 if mode == "min" else -1.0
    return min(finalists, key=lambda t: sign * t.value)
