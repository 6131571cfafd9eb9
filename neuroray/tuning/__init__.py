"""Hyperparameter sweeps of fine-tuning jobs with Ray Tune (``neuroray tune CONFIG``)."""

from __future__ import annotations

from neuroray.tuning.sweeps import SweepConfig, SweepResult, prepare_sweep, tune_sweep

__all__ = ["SweepConfig", "SweepResult", "prepare_sweep", "tune_sweep"]
