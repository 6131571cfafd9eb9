"""The neuroray command: working subcommands, one-line errors, non-zero exits."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

import neuroray
from neuroray.cli import build_parser, job_commands, main
from neuroray.config_docs import describe_keys
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


# ---------------------------------------------------------------------- a CLI that explains itself
def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"neuroray {neuroray.__version__} (ray ")


@pytest.mark.parametrize("command", sorted(job_commands(build_parser())))
def test_every_job_help_lists_the_keys_of_its_model(capsys, command):
    model = job_commands(build_parser())[command].keys_from()
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--print-config" in out
    for key in describe_keys(model):  # every key, with its type and default, as the model says
        line = next((row for row in out.splitlines() if row.split()[:1] == [key.key]), None)
        if key.section:
            line = next(row for row in out.splitlines() if row.split()[:1] == [key.key + ":"])
        assert line is not None, key.key
        assert key.type in line and (key.section or key.default in line), (line, key)


def test_help_shows_types_defaults_and_the_fields_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "mae", "--help"])
    out = capsys.readouterr().out
    assert re.search(r"run\.steps\s+int = 100\n", out)
    assert re.search(r"run\.amp\s+auto\|bf16\|off = \"auto\"\n\s+\"auto\": bf16 autocast", out)
    assert re.search(r"data\.image\s+str = required", out)
    assert "Crops per worker per step." in out  # the docstring under RunSettings.batch_size


def test_config_show_names_a_job_or_suggests_one(capsys):
    assert main(["config", "show", "finetune", "em"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("neuroray finetune em: FinetuneJob")
    assert re.search(r"\n  task\s+str = \"em\"\n\s+A registered segmentation task", out)
    assert "data.labels" in out and "validation.roi" in out
    assert main(["config", "show", "finetune", "emm"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'finetune em'" in err and err.count("\n") == 1


def test_print_config_prints_the_resolved_job_and_exits(capsys, tmp_path):
    from neuroray.config import load_config
    from neuroray.trainers.pretrain import MAEJob

    overrides = ["run.steps=7", "model.encoder.depth=3", "data.image=/nowhere/raw"]
    argv = ["pretrain", "mae", "configs/pretrain_mae.yaml", *overrides, "--print-config"]
    assert main(argv) == 0  # the missing image is not looked for: nothing runs
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["run"]["steps"] == 7 and resolved["model"]["encoder"]["depth"] == 3
    assert resolved["data"]["image"] == "/nowhere/raw"
    assert resolved["run"]["name"] == "mae_medulla_s1"  # from the YAML
    saved = tmp_path / "job.yaml"
    saved.write_text(printed)  # the printout is a config that loads back to the same job
    assert load_config(MAEJob, saved) == load_config(MAEJob, "configs/pretrain_mae.yaml", overrides)


def test_ingest_takes_a_voxel_size_and_warns_when_the_source_has_none(capsys, tmp_path):
    source = tmp_path / "raw.npy"
    np.save(source, np.zeros((4, 8, 8), np.uint8))
    assert main(["data", "ingest", str(source), str(tmp_path / "a"), "--image"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "voxel size" in line]
    assert len(warning) == 1 and warning[0].startswith("neuroray: warning:")
    assert "--voxel-size" in warning[0]
    assert open_volume(tmp_path / "a").voxel_size == (1.0, 1.0, 1.0)

    argv = ["data", "ingest", str(source), str(tmp_path / "b"), "--image", "--voxel-size", "40,8,8"]
    assert main(argv) == 0
    assert "voxel size" not in capsys.readouterr().err
    assert open_volume(tmp_path / "b").voxel_size == (40.0, 8.0, 8.0)
    with pytest.raises(SystemExit):
        main(["data", "ingest", str(source), str(tmp_path / "c"), "--voxel-size", "40,8"])
    assert "3 positive numbers" in capsys.readouterr().err


def test_evaluate_refuses_layers_of_other_voxel_sizes_in_one_line(capsys, tmp_path):
    from neuroray.platform.volume import create_volume

    labels = np.ones((4, 8, 8), np.uint32)
    for name, voxel in (("seg", (40, 8, 8)), ("gt", (40, 4, 4))):
        volume = create_volume(tmp_path / name, shape=labels.shape, dtype=labels.dtype,
                               voxel_size=voxel, layer_type="segmentation")  # fmt: skip
        volume[:] = labels
    out = tmp_path / "eval"
    argv = ["evaluate", str(tmp_path / "seg"), str(tmp_path / "gt"), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuroray: error:") and err.count("\n") == 1
    assert "40x8x8" in err and "40x4x4" in err and not out.exists()
