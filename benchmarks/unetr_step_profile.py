"""Where a UNETR fine-tuning step's time goes (issue 14, item 2): the whole model against its ViT
encoder alone, at the EM table's recipe and the probes' variations, with the table's U-Net beside.

    .venv/bin/python benchmarks/unetr_step_profile.py [--steps 4] [--threads 2]

One step is forward + backward of a batch on random input (the time does not depend on the
values); the encoder alone is ``forward_features`` + backward of its tokens, so
``1 - encoder_s / step_s`` is the share of the step outside the encoder: the convolutional
decoder. Every pretraining initialises only the encoder, so that share says how much of what
the fine-tune computes pretraining can reach. Writes ``benchmarks/results/unetr_step_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from neuroray.models.unet import UNet3D, UNetConfig
from neuroray.models.unetr import UNETRConfig, build_unetr

OUT = Path(__file__).parent / "results" / "unetr_step_profile.json"

#: (crop, decoder feature_size) for the UNETR rows: the EM recipe first, then the probes' changes.
UNETR_ROWS = [((16, 64, 64), 16), ((16, 64, 64), 8), ((16, 64, 64), 32), ((32, 96, 96), 16)]
#: The EM table's U-Net (benchmarks/em_quality.py): four levels, batch 2 on 16x96x96 crops.
UNET = UNetConfig(
    size=None, channels=(8, 24, 72, 216), downsample=((1, 2, 2), (2, 2, 2), (2, 2, 2))
)


def seconds_per_call(fn: Callable[[], None], steps: int) -> float:
    """Mean wall time of ``fn`` over ``steps`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def train_step(model: nn.Module, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        forward().float().pow(2).mean().backward()

    return step


def parameters_m(model: nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def unetr_row(crop: tuple[int, int, int], feature_size: int, batch: int, steps: int) -> dict:
    encoder = {"size": None, "width": 128, "depth": 4, "heads": 4, "patch_size": [4, 16, 16],
               "img_size": list(crop), "pos_embed": "learned"}  # fmt: skip
    model = build_unetr(UNETRConfig(encoder=encoder, feature_size=feature_size))
    x = torch.randn(batch, 1, *crop)
    step_s = seconds_per_call(train_step(model, lambda: model(x)), steps)
    encoder_s = seconds_per_call(
        train_step(model, lambda: model.encoder.forward_features(x).tokens), steps
    )
    return {"model": "unetr", "crop": list(crop), "batch": batch, "feature_size": feature_size,
            "step_s": round(step_s, 3), "encoder_s": round(encoder_s, 3),
            "decoder_share": round(1 - encoder_s / step_s, 3),
            "samples_per_s": round(batch / step_s, 2), "params_m": parameters_m(model)}  # fmt: skip


def unet_row(crop: tuple[int, int, int], batch: int, steps: int) -> dict:
    model = UNet3D(UNET, out_channels=3)
    x = torch.randn(batch, 1, *crop)
    step_s = seconds_per_call(train_step(model, lambda: model(x)), steps)
    return {"model": "unet", "crop": list(crop), "batch": batch, "channels": list(UNET.channels),
            "step_s": round(step_s, 3), "samples_per_s": round(batch / step_s, 2),
            "params_m": parameters_m(model)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the fine-tune's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [unetr_row(crop, fs, 4, args.steps) for crop, fs in UNETR_ROWS]
    rows.append(unet_row((16, 96, 96), 2, args.steps))
    for row in rows:
        print(json.dumps(row))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
