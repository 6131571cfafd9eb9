"""Fine-tuning samples/s through the real job (chunk servers, Ray Train, augmentation), side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/finetune_throughput.py [--data ../shared/data] [--steps 40]

Rows, all in one run on the same Ray: the shipped EM fine-tuning (``configs/finetune_em.yaml``,
UNETR) and the same job with ``model.name=unet`` (16×96×96 crops, batch 2, as em_quality), each once with
``run.cpus_per_worker=1`` (one torch thread, the old default) and once with the default (the CPUs
Ray has free: the whole laptop). samples/s is Ray Train's own report averaged over the last half
of the steps (the first half includes start-up). Prints a markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

ROWS = {
    "unetr (shipped)": [],
    "unet small": [
        "model.name=unet",
        "model.unet.size=small",
        "data.sampler.crop_shape=[16,96,96]",
        "run.batch_size=2",
    ],
}
CPUS = {"1 CPU (old default)": ["run.cpus_per_worker=1"], "all free CPUs (default)": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    from neuroray import configs
    from neuroray.config import override
    from neuroray.platform.ingest import ingest
    from neuroray.runtime import connect
    from neuroray.trainers.finetune import FinetuneJob, finetune

    connect(object_store_mb=1024, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="ft_throughput_"))
    layers = {}
    for name, labels in (("raw", False), ("labels", True)):
        layers[name] = str(tmp / name)
        source = f"{args.data}/em/fib_medulla_s2.h5#{name}"
        ingest(source, layers[name], chunk_shape=(64, 64, 64), labels=labels, progress=False)
    rates: dict[tuple[str, str], float] = {}
    for row, row_overrides in ROWS.items():
        for cpus, cpu_overrides in CPUS.items():
            overrides = [
                override("data.image", layers["raw"]),
                override("data.labels", layers["labels"]),
                override("run.storage_path", str(tmp / "runs")),
                override("run.name", f"{row.split()[0]}_{len(cpu_overrides)}"),
                override("run.steps", args.steps),
                # two reports (with checkpoints): samples/s of each covers half the steps
                override("run.checkpoint_every", args.steps // 2),
                override("run.report_every", args.steps // 2),
                "validation.roi=null",
                *row_overrides,
                *cpu_overrides,
            ]
            result = finetune(configs.load(FinetuneJob, "finetune_em", overrides))
            rates[row, cpus] = float(result.metrics_dataframe["samples_per_s"].iloc[-1])
            print(f"{row}, {cpus}: {rates[row, cpus]:.2f} samples/s", flush=True)
    print("\n| model | " + " | ".join(CPUS) + " | ratio |\n|---|" + "---:|" * (len(CPUS) + 1))
    for row in ROWS:
        one, every = (rates[row, cpus] for cpus in CPUS)
        print(f"| {row} | {one:.2f} | {every:.2f} | {every / one:.2f}x |")


if __name__ == "__main__":
    main()
