"""The neuroray command: working subcommands, one-line errors, non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from neuroray.cli import build_parser, main
from neuroray.platform.volume import open_volume


def test_info_prints_metadata(capsys, em_volume):
    assert main(["data", "info", em_volume.labels]) == 0  # the stand-in has gala's shape
    info = json.loads(capsys.readouterr().out)
    assert info["shape_zyx"] == [50, 100, 200]
    assert info["voxel_size_nm_zyx"] == [10.0, 10.0, 10.0]
    assert info["layer_type"] == "segmentation"


def test_ingest_then_info_shows_manifest(capsys, em_volume, tmp_path):
    src = em_volume.labels
    dst = str(tmp_path / "labels")
    assert main(["data", "ingest", src, dst, "--chunks", "25,50,100", "--labels"]) == 0
    assert "8 chunks written" in capsys.readouterr().out
    assert main(["data", "info", dst]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "precomputed"
    assert info["manifest"]["chunks"] == 8
    assert 0.9 < info["manifest"]["mean_foreground_fraction"] < 0.95  # 7-9% boundary voxels
    np.testing.assert_array_equal(open_volume(dst)[:], open_volume(src)[:])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["data", "info", "/nonexistent/file.h5#raw"], "does not exist"),
        (["data", "ingest", "/nonexistent.npy", "/tmp/x"], "does not exist"),
    ],
)
def test_errors_are_one_line_and_exit_nonzero(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("neuroray: error:") and err.count("\n") == 1
    assert "Traceback" not in err


def test_console_script_exit_code_and_help(tmp_path):
    exe = [sys.executable, "-m", "neuroray.cli"]
    done = subprocess.run(
        [*exe, "data", "info", str(tmp_path / "x.h5#k")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    helped = subprocess.run([*exe, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    for command in ("data", "demo"):
        assert command in helped.stdout


def test_only_working_commands_are_listed():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    for name, sub in commands.items():
        assert sub.get_default("func") is not None or sub._subparsers is not None, name


def test_data_lm_prepares_stacks_and_checks_pairs(capsys, lm_stack, tmp_path):
    argv = ["data", "lm", str(tmp_path / "op"), str(lm_stack.tif), str(lm_stack.swc)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    z, y, x = open_volume(lm_stack.tif).shape
    assert f"{lm_stack.tif.stem}: roi [0, 0, 0, {z}, {y}, {x}]" in out
    if lm_stack.real:
        assert "OP_1: roi [0, 0, 0, 60, 512, 512]" in out
    labels = open_volume(tmp_path / "op" / "labels")
    assert labels.layer_type == "segmentation" and labels[:].any()
    assert main(argv[:-1]) == 2
    assert "in pairs" in capsys.readouterr().err
