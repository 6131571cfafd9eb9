"""Ingest throughput (MB/s) beside a plain numpy copy of the same data, in one run.

    .venv/bin/python benchmarks/ingest_throughput.py [--data ../shared/data]

Source: fib_medulla_s2.h5 (250³ uint8 raw, uint32 labels). Baseline: read the whole dataset
into RAM and ``np.save`` it (one contiguous write, no chunking, no compression, no manifest).
Ingest: chunked 64³ writes (precomputed raw+gzip / compressed_segmentation+gzip, or zarr v3 +
zstd), per-chunk statistics and resume markers, and the Parquet manifest.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    args = parser.parse_args()

    from neuroray.platform.ingest import ingest
    from neuroray.platform.volume import open_volume

    with tempfile.TemporaryDirectory() as tmp:  # import CloudVolume, zarr, pyarrow before timing
        np.save(f"{tmp}/warm.npy", np.zeros((8, 8, 8), np.uint8))
        ingest(f"{tmp}/warm.npy", f"{tmp}/warm", progress=False)
        ingest(f"{tmp}/warm.npy", f"{tmp}/warm.zarr", progress=False)
    print(
        "| dataset | numpy copy MB/s | ingest → precomputed MB/s (ratio) | ingest → zarr v3 MB/s (ratio) |"
    )
    print("|---|---:|---:|---:|")
    for key in ("raw", "labels"):
        src = f"{args.data}/em/fib_medulla_s2.h5#{key}"
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            array = open_volume(src)[:]
            np.save(f"{tmp}/copy.npy", array)
            megabytes = array.nbytes / 1e6
            numpy_rate = megabytes / (time.perf_counter() - t0)
            rates = []
            for dst in (f"{tmp}/layer", f"{tmp}/layer.zarr"):
                t0 = time.perf_counter()
                ingest(src, dst, chunk_shape=(64, 64, 64), progress=False)
                rates.append(megabytes / (time.perf_counter() - t0))
        print(
            f"| {key} ({array.dtype}, {megabytes:.1f} MB) | {numpy_rate:.0f} | "
            f"{rates[0]:.0f} ({rates[0] / numpy_rate:.2f}×) | {rates[1]:.0f} ({rates[1] / numpy_rate:.2f}×) |"
        )


if __name__ == "__main__":
    main()
