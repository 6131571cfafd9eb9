"""Every registered segmentation task, checked the same way (timm style: parametrised over all)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroray.errors import RegistryError
from neuroray.segmentation.tasks import TASKS, TargetSettings, ValidationSettings, get_task


def _labels() -> np.ndarray:
    """Two touching objects and a background slab, 8x16x16."""
    labels = np.zeros((8, 16, 16), np.uint32)
    labels[:, :, :8] = 1
    labels[:, :, 8:14] = 2
    return labels


@pytest.mark.parametrize("name", TASKS.names())
def test_targets_match_the_declared_output_channels(name):
    task = get_task(name)
    target, weight = task.targets(_labels(), TargetSettings())
    assert target.shape == weight.shape == (task.out_channels(TargetSettings()), 8, 16, 16)
    assert set(np.unique(target)) <= {0.0, 1.0} and (weight >= 0).all()


@pytest.mark.parametrize("name", TASKS.names())
def test_loss_prefers_the_target_to_its_opposite(name):
    task = get_task(name)
    target, weight = (torch.from_numpy(a[None]) for a in task.targets(_labels(), TargetSettings()))
    right = (target * 2 - 1) * 8  # confident logits of the target
    right_loss, scalars = task.loss(right, target, weight, TargetSettings())
    wrong_loss, _ = task.loss(-right, target, weight, TargetSettings())
    assert float(right_loss) < 0.01 < float(wrong_loss)
    assert all(key.startswith("loss_") for key in scalars)


@pytest.mark.parametrize("name", TASKS.names())
def test_a_perfect_prediction_validates_perfectly(name):
    task = get_task(name)
    labels = _labels()
    target, _ = task.targets(labels, TargetSettings())
    metrics = task.validate(target, labels, (1.0, 1.0, 1.0), ValidationSettings())
    assert task.default_metric in task.validation_metrics
    assert set(task.validation_metrics) <= set(metrics)
    best = metrics[task.default_metric]
    assert best == pytest.approx(0.0 if task.validation_metrics[task.default_metric] == "min"
                                 else 1.0, abs=1e-6)


@pytest.mark.parametrize("name", TASKS.names())
def test_evaluating_the_ground_truth_against_itself_is_perfect(name):
    task = get_task(name)
    labels = _labels()
    scores = task.evaluate(labels, labels)
    assert scores
    for key, value in scores.items():
        assert value == pytest.approx(0.0 if key.startswith(("voi", "arand", "cremi")) else 1.0,
                                      abs=1e-6), key


def test_unknown_tasks_are_named_with_the_closest():
    with pytest.raises(RegistryError, match="did you mean 'mito'"):
        get_task("mitp")
