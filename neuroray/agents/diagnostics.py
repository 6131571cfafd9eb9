"""Is the masking policy learning *where* to mask? Cheap diagnostics on a fixed probe batch.

A policy that only learned *how much* (the emergent game's collapse) gives every patch of a crop
about the same probability; one that learned *where* tells the patches of a crop apart, and in
the order of how hard they are to reconstruct, not merely by where they sit. The RL side
(:class:`~neuroray.agents.runner.RLRunner`) computes :func:`placement_diagnostics` on a fixed
batch of probe crops, drawn once with their own seed and never trained on, every
``rl.preview_every`` iterations and at the end, and logs them as ``rl/diag_*``; the last values go
into the run's summary (``rl/diag_*`` in the result's metrics and ``rl_state.json``).

All correlations are *within a crop* (the count is fixed per crop, so only the order inside a
crop matters) and averaged over the probe crops; Spearman, so any monotone score works:

- ``within_crop_sd``: standard deviation of the nomination probability within each crop;
- ``spearman_heldout_loss``: probability vs the per-patch loss of the masked patches under a
  *random* K-mask (the oracle's reward target; losses a clever mask choice cannot game);
- ``spearman_gradient_energy``: probability vs the patch's gradient energy (a cheap heuristic);
- ``spearman_position``: probability vs the mean probability at the same grid position over the
  *other* probe crops (what position alone explains);
- ``partial_heldout_loss``: the loss correlation with the position score partialled out.

A crop where the policy gives every patch the same probability has no order: its correlations
are undefined and left out of the means (0 when no crop has one).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two 1D arrays (ties averaged); NaN if either is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def partial_correlation(r_xy: float, r_xz: float, r_yz: float) -> float:
    """Correlation of x and y with z partialled out, from the three pairwise correlations."""
    denom = np.sqrt(max(0.0, (1 - r_xz**2) * (1 - r_yz**2)))
    return float((r_xy - r_xz * r_yz) / denom) if denom > 1e-12 else float("nan")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else 0.0


def placement_diagnostics(
    probs: np.ndarray, losses: np.ndarray, masks: np.ndarray, grad_energy: np.ndarray
) -> dict[str, float]:
    """The diagnostics of the module docstring from probe crops' arrays, each [B, N] (B >= 2).

    ``probs``: the policy's probability of nominating each patch; ``losses``: per-patch losses
    under the random ``masks`` (bool, True = masked); ``grad_energy``: the patches' gradient
    energy (or any monotone transform of it, e.g. its log from the observations).
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    shape = probs.shape
    losses = np.asarray(losses, dtype=np.float64).reshape(shape)
    masks = np.asarray(masks, dtype=bool).reshape(shape)
    energy = np.asarray(grad_energy, dtype=np.float64).reshape(shape)
    b = len(probs)
    if b < 2:
        raise ValueError("placement_diagnostics needs at least 2 probe crops (position is a mean)")
    loss_r, energy_r, position_r, partial_r = [], [], [], []
    total = probs.sum(0)
    for c in range(b):
        position = (total - probs[c]) / (b - 1)  # mean at each position over the other crops
        m = masks[c]
        r_pl = spearman(probs[c][m], losses[c][m])
        r_pz = spearman(probs[c][m], position[m])
        r_lz = spearman(losses[c][m], position[m])
        loss_r.append(r_pl)
        energy_r.append(spearman(probs[c], energy[c]))
        position_r.append(spearman(probs[c], position))
        partial_r.append(partial_correlation(r_pl, r_pz, r_lz) if np.isfinite(r_pz) else r_pl)
    return {
        "within_crop_sd": float(probs.std(1).mean()),
        "spearman_heldout_loss": _mean(loss_r),
        "spearman_gradient_energy": _mean(energy_r),
        "spearman_position": _mean(position_r),
        "partial_heldout_loss": _mean(partial_r),
    }
