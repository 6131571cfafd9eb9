"""Where one pretraining step's time goes, by component: MS-Con (fast default and published) beside
MAE, same encoder, same crop.

    .venv/bin/python benchmarks/mscon_profile.py [--crops 32x160x160 16x64x64] [--steps 3]
        [--batch 2] [--encoder tiny] [--variants fast published] [--trace runs/profile]

A step runs in stages. Each component's forward runs inside a ``record_function`` region
("<component>.forward"); its outputs are detached into fresh leaves that the next components
take as inputs; after the loss, backward runs component by component in reverse
("<component>.backward"), each fed the gradients its consumers left on its output leaves. So
every component's forward and backward are timed on their own (wall clock, synchronised on CUDA)
and their sum is one whole step: the table also shows the plain, unstaged step for comparison.
FLOPs per component are torch's count (FlopCounterMode) of the untimed warm-up step.

MS-Con components: encoder (both views, one batch of 2B; the fast variant's mask-token fill
included), decoder (UNETR stages), head (reconstruction), pyramid pooling, token projection,
cross-attention, losses (InfoNCE, the two consistency terms, MSE), optimizer (AdamW). MAE:
encoder (visible tokens), decoder, loss, optimizer. ``--trace DIR`` also records the timed steps
with torch.profiler (a Chrome trace per row and the top operators by self time).

Prints one table per crop and writes the rows to ``benchmarks/results/mscon_profile.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.autograd.profiler import record_function
from torch.utils.flop_counter import FlopCounterMode

from neuroray.masking import RandomMasker
from neuroray.models.mae import MAEConfig, build_mae3d, masked_mse
from neuroray.models.mscon import MSConConfig, build_mscon

MAE_DECODERS = {
    "tiny": {"decoder_width": 128, "decoder_depth": 2, "decoder_heads": 4},
    "base": {"decoder_width": 512, "decoder_depth": 6, "decoder_heads": 16},
}
OUT = Path(__file__).parent / "results" / "mscon_profile.json"


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


def _leaves(value: Any) -> Any:
    """The same structure with every tensor detached (a leaf that keeps requires_grad)."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    if isinstance(value, list | tuple):
        return type(value)(_leaves(item) for item in value)
    return value


class Stages:
    """Runs a step component by component, timing (and optionally counting) forward and backward."""

    def __init__(self, device: torch.device, count_flops: bool = False) -> None:
        self.device = device
        self.count_flops = count_flops
        self.ms: dict[tuple[str, str], float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self.order: list[str] = []
        self._done: list[tuple[str, Any, Any]] = []

    def _timed(self, name: str, phase: str, fn: Callable[[], Any]) -> Any:
        if name not in self.order:
            self.order.append(name)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with record_function(f"{name}.{phase}"):
            if self.count_flops:
                with FlopCounterMode(display=False) as counter:
                    out = fn()
                self.flops[name] += counter.get_total_flops()
            else:
                out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.ms[name, phase] += (time.perf_counter() - start) * 1e3
        return out

    def run(self, name: str, fn: Callable[..., Any], *inputs: Any) -> Any:
        """``fn(*inputs)`` as component ``name``; returns its outputs as detached leaves."""
        out = self._timed(name, "forward", lambda: fn(*inputs))
        leaves = _leaves(out)
        self._done.append((name, out, leaves))
        return leaves

    def loss(self, name: str, fn: Callable[[], torch.Tensor]) -> None:
        """The last component (returns the loss), then backward through every component."""
        loss = self._timed(name, "forward", fn)
        self._timed(name, "backward", loss.backward)
        for stage, out, leaves in reversed(self._done):
            pairs = [
                (o, leaf.grad)
                for o, leaf in zip(_tensors(out), _tensors(leaves), strict=True)
                if leaf.grad is not None
            ]
            if pairs:
                outs, grads = zip(*pairs, strict=True)
                self._timed(
                    stage, "backward", lambda o=outs, g=grads: torch.autograd.backward(o, g)
                )
        self._done.clear()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self._timed("optimizer", "forward", optimizer.step)
        optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------- the methods


def mscon_setup(encoder: dict, crop: tuple[int, int, int], batch: int, variant: str, device):
    model = build_mscon(
        MSConConfig.model_validate(
            {"encoder": {**encoder, "img_size": list(crop)}, "variant": variant}
        )
    ).to(device)
    clean = torch.rand(batch, 1, *crop, device=device)
    weak = clean + 0.02 * torch.randn_like(clean)
    strong = clean + 0.1 * torch.randn_like(clean)

    def staged(s: Stages) -> None:
        views = torch.cat([weak, strong])
        keep = model.draw_keep(len(views), model.encoder.grid_of(views), views.device)
        grid = s.run("encoder", model.encode, views, keep)
        levels = s.run("decoder", model.decode, grid)
        recon = s.run("head", model.unetr.head, levels[-1])
        pooled = s.run("pyramid pooling", model.pool, [grid, *levels])
        tokens = s.run("token projection", model.project, pooled)
        attended = s.run("cross-attention", model.attend, tokens)
        s.loss("losses", lambda: model.score(recon, tokens, attended, clean).loss)

    def plain() -> torch.Tensor:
        return model(weak, strong, clean).loss

    return model, staged, plain


def mae_setup(encoder: dict, crop: tuple[int, int, int], batch: int, name: str, device):
    model = build_mae3d(
        MAEConfig.model_validate(
            {"encoder": {**encoder, "img_size": list(crop)}, **MAE_DECODERS[name]}
        )
    ).to(device)
    x = torch.rand(batch, 1, *crop, device=device)
    grid = model.encoder.grid_of(x)
    masker, rng = RandomMasker(ratio=0.75), np.random.default_rng(0)

    def draw_mask() -> torch.Tensor:
        return model.flat_mask(torch.from_numpy(masker.mask((batch, *grid), rng)), x)

    def staged(s: Stages) -> None:
        mask = draw_mask()
        encoded = {}

        def encode() -> torch.Tensor:
            encoded["out"] = model.encoder.forward_features(x, keep=~mask)
            return encoded["out"].tokens

        tokens = s.run("encoder", encode)
        pred = s.run(
            "decoder",
            lambda t: model.decode(dataclasses.replace(encoded["out"], tokens=t), mask)[0],
            tokens,
        )
        s.loss("losses", lambda: masked_mse(pred, model.targets(x)[0], mask)[0])

    def plain() -> torch.Tensor:
        return model(x, draw_mask()).loss

    return model, staged, plain


# ---------------------------------------------------------------------------------- measuring


def profile_row(
    label: str,
    setup: tuple,
    steps: int,
    batch: int,
    device: torch.device,
    trace: Path | None,
) -> dict:
    """Per-component ms/sample (forward, backward), GFLOP/sample and the plain step's ms/sample."""
    model, staged, plain = setup
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    counted = Stages(device, count_flops=True)
    staged(counted)  # warm-up, counted
    counted.step(optimizer)
    timed = Stages(device)
    profiler = None
    if trace is not None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
        profiler.__enter__()
    for _ in range(steps):
        staged(timed)
        timed.step(optimizer)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        trace.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(trace / f"{label.replace(' ', '_')}.json"))
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    # the plain step, as training runs it: one untimed, then the timed ones
    def plain_step() -> None:
        loss = plain()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    plain_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        plain_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    plain_ms = (time.perf_counter() - start) * 1e3 / steps / batch
    per = steps * batch
    components = [
        {
            "component": name,
            "forward_ms": timed.ms[name, "forward"] / per,
            "backward_ms": timed.ms[name, "backward"] / per,
            "gflop": counted.flops[name] / batch / 1e9,
        }
        for name in timed.order
    ]
    total = sum(c["forward_ms"] + c["backward_ms"] for c in components)
    for c in components:
        c["share"] = (c["forward_ms"] + c["backward_ms"]) / total
    return {
        "staged_ms_per_sample": total,
        "plain_ms_per_sample": plain_ms,
        "gflop_per_sample": sum(c["gflop"] for c in components),
        "components": components,
    }


def print_table(crop, rows: list[dict]) -> None:
    mae = next((r for r in rows if r["method"] == "mae"), None)
    print(f"\n### crop {'×'.join(map(str, crop))}\n")
    for r in rows:
        ratio = (
            f", {r['plain_ms_per_sample'] / mae['plain_ms_per_sample']:.1f}× MAE's step"
            if mae and r is not mae
            else ""
        )
        print(
            f"**{r['label']}**: plain step {r['plain_ms_per_sample']:.0f} ms/sample{ratio} "
            f"(staged {r['staged_ms_per_sample']:.0f}), {r['gflop_per_sample']:.1f} GFLOP/sample\n"
        )
        print("| component | forward ms | backward ms | GFLOP | share |")
        print("|---|---:|---:|---:|---:|")
        for c in r["components"]:
            print(
                f"| {c['component']} | {c['forward_ms']:.1f} | {c['backward_ms']:.1f} | "
                f"{c['gflop']:.2f} | {c['share']:.0%} |"
            )
        print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--crops", nargs="+", default=["32x160x160", "16x64x64"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--encoder", default="tiny", choices=list(MAE_DECODERS))
    parser.add_argument("--variants", nargs="+", default=["fast", "published"])
    parser.add_argument("--trace", type=Path, default=None, help="torch.profiler traces here")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = {"size": args.encoder}
    rows = []
    for text in args.crops:
        crop = tuple(int(c) for c in text.split("x"))
        crop_rows = []
        setups = [(f"MAE {args.encoder}", "mae", None)] + [
            (f"MS-Con {args.encoder} {variant}", "mscon", variant) for variant in args.variants
        ]
        for label, method, variant in setups:
            torch.manual_seed(0)
            load = os.getloadavg()[0]
            setup = (
                mae_setup(encoder, crop, args.batch, args.encoder, device)
                if variant is None
                else mscon_setup(encoder, crop, args.batch, variant, device)
            )
            row = profile_row(label, setup, args.steps, args.batch, device, args.trace)
            crop_rows.append(
                {
                    "label": label,
                    "method": method,
                    "variant": variant,
                    "encoder": args.encoder,
                    "crop": list(crop),
                    "batch": args.batch,
                    "timed_steps": args.steps,
                    "device": torch.cuda.get_device_name()
                    if device.type == "cuda"
                    else f"CPU ({torch.get_num_threads()} threads)",
                    **row,
                    "load_before": load,
                    "load_after": os.getloadavg()[0],
                }
            )
        print_table(crop, crop_rows)
        rows += crop_rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"rows in {args.out}")


if __name__ == "__main__":
    main()
