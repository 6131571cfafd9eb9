"""Hyperparameter sweeps of fine-tuning jobs with Ray Tune (``neuroray tune CONFIG``)."""

from __future__ import annotations

from neuroray.tuning.sweeps import SweepJob, SweepResult, prepare_sweep, tune_sweep

__all__ = ["SweepJob", "SweepResult", "prepare_sweep", "tune_sweep"]
