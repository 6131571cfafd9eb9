"""What every quality benchmark shares: a resumable log of finished (row, seed) records and the
tables built from it in ``benchmarks/results/<table>.json``.

A record is one row's result for one seed: ``name``, ``model``, ``init``, the row key ``row``,
``seed`` and one dict of metrics per scored part (``test``, ``cross``, ...), plus the config and
overrides that produced it. A table gathers one part of every record: per row, the seeds, each
metric's per-seed list, its mean and sd.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


class RowLog:
    """``<out>/rows.jsonl``: records appended as they finish, so a long table resumes."""

    def __init__(self, path: Path, on_record: Callable[[list[dict]], None]) -> None:
        self.path = path
        self.on_record = on_record
        lines = path.read_text().splitlines() if path.exists() else []
        self.records: list[dict[str, Any]] = [json.loads(line) for line in lines]

    def done(self, row: str, seed: int) -> bool:
        return any(r["row"] == row and r["seed"] == seed for r in self.records)

    def run(self, row: str, seed: int, produce: Callable[[], dict[str, Any]]) -> None:
        """Produce (row, seed) unless already logged; keep the load average around it."""
        if self.done(row, seed):
            return
        load_before = os.getloadavg()[0]
        result = produce()
        result.update(row=row, seed=seed, load_before=load_before, load_after=os.getloadavg()[0])
        self.records.append(result)
        with self.path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        self.on_record(self.records)


def write_table(
    table: str, part: str, records: list[dict], *, label_fraction: float, budget_s: float
) -> list[dict]:
    """Aggregate ``part`` of the finished records into ``benchmarks/results/<table>.json``."""
    rows: dict[str, dict] = {}
    for rec in records:
        row = rows.setdefault(rec["row"], {
            "name": rec["name"], "model": rec["model"], "init": rec["init"],
            "budget_s": None if rec["model"] == "none" else budget_s,
            "label_fraction": label_fraction, "seeds": [], "metrics": {},
            "config": rec.get("config"), "overrides": rec.get("overrides", []),
            **({"params": rec["params"]} if "params" in rec else {}),
        })  # fmt: skip
        row["seeds"].append(rec["seed"])
        if "pretraining" in rec:  # its steps and wall time, stated beside the fine-tuning budget
            row.setdefault("pretraining", []).append(rec["pretraining"])
        for key, value in rec[part].items():
            row["metrics"].setdefault(key, []).append(value)
    out = []
    for row in rows.values():
        flat = {**{k: v for k, v in row.items() if k != "metrics"}, **row["metrics"]}
        flat["mean"] = {k: round(statistics.fmean(v), 4) for k, v in row["metrics"].items()}
        flat["sd"] = {
            k: round(statistics.stdev(v), 4) if len(v) > 1 else 0.0
            for k, v in row["metrics"].items()
        }
        out.append(flat)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{table}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def print_table(table: str, rows: list[dict], keys: list[str]) -> None:
    """The table as markdown: mean ± sd (each seed's value) per metric."""
    print(f"\n### {table}\n\n| row | seeds | " + " | ".join(keys) + " |")
    print("|---|---|" + "---:|" * len(keys))
    for row in rows:
        cells = [
            f"{row['mean'][k]:.3f} ± {row['sd'][k]:.3f} ({', '.join(f'{v:.3f}' for v in row[k])})"
            for k in keys
        ]
        print(f"| {row['name']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
