"""``neuroray view``: layers served offline to a real headless Chromium, which renders them.

The browser is Debian's ``chromium`` with ``chromium-driver``; the set-up installs them when
missing and it can (root with apt-get), and skips, saying why, only where it cannot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from written_layers import write_affinity_layer, write_layer

from neuroray.view import resolve_layers, view_command

VOXEL = (40.0, 8.0, 8.0)  # z, y, x nm: anisotropic, so a swapped axis shows
SHAPE = (16, 96, 128)


def _install_chromium() -> str | None:
    """None when chromium and chromedriver are there (installed here if need be), else why not."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "no chromium/chromedriver, and no root apt-get to install Debian's packages"
    install = "apt-get update -qq && apt-get install -y -qq chromium chromium-driver"
    done = subprocess.run(["bash", "-c", install], capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not shutil.which("chromedriver"):
        return f"installing chromium failed: {done.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="module")
def chromium() -> None:
    reason = _install_chromium()
    if reason is not None:
        pytest.skip(f"needs a headless browser: {reason}")


@pytest.fixture(scope="module")
def layers(tmp_path_factory) -> tuple[str, str, np.ndarray]:
    """A precomputed image (bright blobs on a gradient) and a zarr segmentation of the blobs."""
    root = tmp_path_factory.mktemp("view")
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    labels = np.zeros(SHAPE, dtype=np.uint32)
    for i, (cy, cx) in enumerate([(24, 30), (30, 90), (70, 40), (66, 100)], start=1):
        labels[((y - cy) ** 2 + (x - cx) ** 2) < 18**2] = i
    image = (40 + x + 80 * (labels > 0)).astype(np.uint8)
    chunks = {"chunk_shape": (16, 64, 64), "voxel_size": VOXEL}
    image_url = write_layer(root / "raw", image, format="precomputed", **chunks)
    seg_url = write_layer(root / "seg.zarr", labels, layer_type="segmentation", **chunks)
    return image_url, seg_url, labels


def _neuroray(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "neuroray.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _check_rendered(png: Path) -> np.ndarray:
    """The screenshot is not blank: it varies, and shows segmentation colours."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(np.float64)
    assert pixels.std() > 10, f"{png} looks blank (pixel std {pixels.std():.1f})"
    spread = pixels.max(axis=2) - pixels.min(axis=2)  # grey image pixels have none
    assert (spread > 40).mean() > 0.01, "no coloured segments in the screenshot"
    return pixels


def _scales_nm(dimensions: dict) -> dict[str, float]:
    units = {"m": 1e9, "nm": 1.0}
    return {name: scale * units[unit] for name, (scale, unit) in dimensions.items()}


def test_screenshot_of_an_image_and_a_segmentation(chromium, layers, tmp_path):
    image_url, seg_url, _ = layers
    png = tmp_path / "view.png"
    done = _neuroray(
        "view", image_url, seg_url, "--screenshot", str(png), "--size", "640x480", "--layout", "xy"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "screenshot:" in done.stdout
    _check_rendered(png)
    state = json.loads(png.with_suffix(".json").read_text())
    assert [(layer["name"], layer["type"]) for layer in state["layers"]] == [
        ("raw", "image"),
        ("seg", "segmentation"),
    ]
    # the browser renders in nm at the layers' voxel size
    want = {"z": VOXEL[0], "y": VOXEL[1], "x": VOXEL[2]}
    assert _scales_nm(state["dimensions"]) == pytest.approx(want)
    for layer in state["layers"]:
        # Neuroglancer writes a source's transform only where it differs from the source's
        # own voxel size (the precomputed info's resolution, the served array's dimensions)
        source = layer["source"]
        source = source[0] if isinstance(source, list) else source
        if isinstance(source, dict) and "transform" in source:
            dims = source["transform"]["outputDimensions"]
            assert _scales_nm(dims) == pytest.approx(want), layer["name"]
    info = json.loads((Path(image_url) / "info").read_text())
    assert info["scales"][0]["resolution"] == list(VOXEL[::-1])  # x, y, z nm
    printed = [line for line in done.stdout.splitlines() if "voxel [40.0, 8.0, 8.0] nm" in line]
    assert [line.split(":")[0] for line in printed] == ["raw", "seg"]
    # the view opens at the centre of the volume (x, y, z voxels)
    assert state["position"] == pytest.approx([SHAPE[2] / 2, SHAPE[1] / 2, SHAPE[0] / 2])
    # the slice fits the 640 x 480 panel: 128 voxels across its 480-pixel side
    assert state["crossSectionScale"] == pytest.approx(SHAPE[2] / 480)
    assert Image.open(png).mode == "RGB"  # Neuroglancer's opaque alpha channel dropped


def test_view_serves_until_interrupted_and_lists_voxel_sizes(layers):
    image_url, seg_url, _ = layers
    command = [sys.executable, "-m", "neuroray.cli", "view", image_url, seg_url]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            lines.append(line)
            if line.startswith("Neuroglancer: "):
                break
        url = lines[-1].removeprefix("Neuroglancer: ").strip()
        assert url.startswith("http://127.0.0.1:"), lines
        assert any("voxel [40.0, 8.0, 8.0] nm" in line and "segmentation" in line for line in lines)
        with urllib.request.urlopen(url, timeout=10) as page:  # the bundled client, offline
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=20)
    assert code == 0, server.stderr.read()[-2000:]


def test_bad_input_is_one_line_before_serving(tmp_path):
    done = _neuroray("view", str(tmp_path / "absent"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("neuroray: error: nothing to view at")
    assert len(done.stderr.strip().splitlines()) == 1


def test_segment_output_folder_view(chromium, ray_session, layers, tmp_path):
    """A real ``segment`` output stands for its affinities and segmentation, rendered."""
    from neuroray.segmentation.blockwise import SegmentJob, segment

    _, _, labels = layers
    url = write_affinity_layer(
        str(tmp_path / "affinities"), labels, chunk_shape=(16, 64, 64), voxel_size=VOXEL
    )
    out = tmp_path / "segmented"
    result = segment(
        SegmentJob(affinities=url, output=str(out), block_shape=(16, 64, 64)), progress=False
    )
    assert [layer.name for layer in resolve_layers([result.output])] == [
        "affinities",
        "segmentation",
    ]
    assert view_command(result.output) == f"neuroray view {out.resolve()}"
    png = tmp_path / "segmented.png"
    done = _neuroray(
        "view", str(out), "--screenshot", str(png), "--size", "640x480", "--layout", "xy"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    _check_rendered(png)
    state = json.loads(png.with_suffix(".json").read_text())
    assert [layer["type"] for layer in state["layers"]] == ["image", "segmentation"]


def test_ingest_prints_the_view_command_and_adds_levels(tmp_path, capsys):
    from neuroray.cli import main

    raw = np.random.default_rng(0).integers(0, 255, (16, 128, 128), np.uint8)
    np.save(tmp_path / "raw.npy", raw)
    dst = tmp_path / "layer"
    argv = [
        "data",
        "ingest",
        str(tmp_path / "raw.npy"),
        str(dst),
        "--image",
        "--multiscale",
        "--chunks",
        "16,32,32",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"view: neuroray view {dst}" in out.splitlines()
    assert f"{dst}: downsampled levels 1-1 added" in out.splitlines()
    info = json.loads((dst / "info").read_text())
    assert [scale["resolution"] for scale in info["scales"]] == [[1, 1, 1], [2, 2, 1]]
    zarr_argv = [
        "data",
        "ingest",
        str(tmp_path / "raw.npy"),
        str(tmp_path / "x.zarr"),
        "--multiscale",
    ]
    assert main(zarr_argv) == 2  # levels are for precomputed layers: refused before any work
    assert not (tmp_path / "x.zarr").exists()


def test_the_demo_saves_a_screenshot_or_says_why_not(
    chromium, layers, tmp_path, monkeypatch, capsys
):
    from neuroray import demo

    image_url, seg_url, _ = layers
    run = demo.DemoRun(out=tmp_path)
    png = tmp_path / "segmentation" / "em_view.png"
    assert demo.save_view(run, [image_url, seg_url], png) == str(png)
    _check_rendered(png)
    assert f"[demo] screenshot of the segmentation: {png}" in capsys.readouterr().out
    # no browser on the PATH: one line saying how to install it, and the demo goes on
    monkeypatch.setenv("PATH", str(tmp_path / "no-browsers"))
    monkeypatch.delenv("SE_CHROMEDRIVER", raising=False)
    assert demo.save_view(run, [image_url, seg_url], tmp_path / "none.png") is None
    out = capsys.readouterr().out
    assert "no screenshot of the segmentation: --screenshot needs a headless browser" in out
    assert (
        "apt-get install chromium chromium-driver" in out and not (tmp_path / "none.png").exists()
    )
