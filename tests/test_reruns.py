"""Reruns never keep stale data: fingerprinted outputs resume, refuse, or truly overwrite.

Each case was seen reporting success while keeping old data (issue 12); each now either refuses
with one line and exit 2 (nothing written), or, with the overwrite flag, equals a fresh run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from written_layers import write_affinity_layer

from neuroray.cli import main
from neuroray.errors import NeurorayError
from neuroray.platform.ingest import ingest
from neuroray.platform.lm_data import read_lm_record
from neuroray.platform.volume import open_volume


def _error_line(capsys) -> str:
    """The one error line the last command printed (progress bars of earlier ones come first)."""
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("neuroray: error: "), err
    return errors[0]


def test_ingest_overwrite_replaces_what_was_there(tmp_path, capsys):
    a = np.arange(64**3, dtype=np.uint16).reshape(64, 64, 64)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", a[::-1].copy())
    dst = str(tmp_path / "dst")
    assert main(["data", "ingest", str(tmp_path / "a.npy"), dst, "--chunks", "32"]) == 0
    assert main(["data", "ingest", str(tmp_path / "b.npy"), dst, "--chunks", "32"]) == 2
    line = _error_line(capsys)
    assert "b.npy" in line and "--overwrite" in line
    np.testing.assert_array_equal(open_volume(dst)[:], a)  # refused: nothing touched
    assert main(["data", "ingest", str(tmp_path / "b.npy"), dst, "--chunks", "32",
                 "--overwrite"]) == 0
    assert "8 chunks written, 0 already done" in capsys.readouterr().out
    np.testing.assert_array_equal(open_volume(dst)[:], a[::-1])
    # the same source again resumes (nothing to do) instead of refusing
    assert main(["data", "ingest", str(tmp_path / "b.npy"), dst, "--chunks", "32"]) == 0
    assert "0 chunks written, 8 already done" in capsys.readouterr().out


def test_a_changed_source_file_is_not_resumed(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((16, 16, 16), np.uint8))
    dst = str(tmp_path / "dst")
    assert main(["data", "ingest", str(tmp_path / "a.npy"), dst]) == 0
    np.save(tmp_path / "a.npy", np.ones((16, 16, 16), np.uint8))  # same name, new content
    assert main(["data", "ingest", str(tmp_path / "a.npy"), dst]) == 2
    assert "source." in _error_line(capsys)


def test_image_layer_rerun_as_labels_is_refused_then_replaced(tmp_path, capsys, em_volume):
    src = em_volume.labels
    dst = str(tmp_path / "layer")
    assert main(["data", "ingest", src, dst, "--image", "--chunks", "25,50,100"]) == 0
    assert open_volume(dst).layer_type == "image"
    assert main(["data", "ingest", src, dst, "--labels", "--chunks", "25,50,100"]) == 2
    assert "layer_type" in _error_line(capsys)
    assert main(["data", "ingest", src, dst, "--labels", "--chunks", "25,50,100",
                 "--overwrite"]) == 0
    assert open_volume(dst).layer_type == "segmentation"
    np.testing.assert_array_equal(open_volume(dst)[:], open_volume(src)[:])


@pytest.mark.parametrize("flag", ["--repair", "--overwrite"])
def test_a_corrupt_chunk_is_repaired_by_rerunning(tmp_path, capsys, em_volume, flag):
    src = em_volume.raw
    dst = tmp_path / "raw"
    assert main(["data", "ingest", src, str(dst), "--chunks", "25,50,100"]) == 0
    chunk = dst / "10_10_10" / "0-100_0-50_0-25.gz"
    chunk.write_bytes(chunk.read_bytes()[:7])  # marker intact: a plain rerun trusts it
    with pytest.raises(NeurorayError, match="--repair"):
        open_volume(dst)[:]
    capsys.readouterr()
    assert main(["data", "ingest", src, str(dst), "--chunks", "25,50,100", flag]) == 0
    out = capsys.readouterr().out
    expected = "1 chunks written (1 failed to decode), 7" if flag == "--repair" else "8 chunks"
    assert expected in out
    np.testing.assert_array_equal(open_volume(dst)[:], open_volume(src)[:])


def test_ingest_never_writes_into_or_deletes_a_foreign_folder(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((8, 8, 8), np.uint8))
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main(["data", "ingest", str(tmp_path / "a.npy"), str(folder), *extra]) == 2
        assert "not a layer" in _error_line(capsys)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_bad_labels_found_part_way_leave_no_layer(tmp_path, capsys):
    labels = np.ones((64, 8, 8), np.int64)
    labels[40:] = -1  # only the second chunk is bad
    np.save(tmp_path / "neg.npy", labels)
    dst = tmp_path / "dst"
    assert main(["data", "ingest", str(tmp_path / "neg.npy"), str(dst), "--labels",
                 "--chunks", "32,8,8"]) == 2
    assert "non-negative" in _error_line(capsys)
    assert not dst.exists()


def test_non_finite_images_are_reported(tmp_path):
    image = np.ones((8, 8, 8), np.float32)
    image[0, 0, :3] = [np.nan, np.inf, -np.inf]
    np.save(tmp_path / "nan.npy", image)
    with pytest.warns(UserWarning, match="3 voxels are NaN or infinite"):
        result = ingest(str(tmp_path / "nan.npy"), str(tmp_path / "dst"), progress=False)
    assert result.nonfinite_voxels == 3


# ---------------------------------------------------------------------- LM layers
def test_lm_rerun_with_another_radius_is_refused_then_equals_a_fresh_run(
    tmp_path, capsys, lm_stack
):
    tif, swc = str(lm_stack.tif), str(lm_stack.swc)
    dst = str(tmp_path / "op")
    assert main(["data", "lm", dst, tif, swc, "--radius-floor-px", "2"]) == 0
    thin = np.count_nonzero(open_volume(f"{dst}/labels")[:])
    assert main(["data", "lm", dst, tif, swc, "--radius-floor-px", "6"]) == 2
    assert "radius_floor_px: 2.0 -> 6.0" in _error_line(capsys)
    assert np.count_nonzero(open_volume(f"{dst}/labels")[:]) == thin  # refused: untouched
    assert main(["data", "lm", dst, tif, swc, "--radius-floor-px", "6", "--overwrite"]) == 0
    fresh = str(tmp_path / "fresh")
    assert main(["data", "lm", fresh, tif, swc, "--radius-floor-px", "6"]) == 0
    rerun, clean = open_volume(f"{dst}/labels")[:], open_volume(f"{fresh}/labels")[:]
    assert np.count_nonzero(clean) > 2 * thin
    np.testing.assert_array_equal(rerun, clean)
    record = read_lm_record(dst)
    assert record["radius_floor_px"] == 6.0
    assert record["stacks"][0]["foreground_fraction"] == pytest.approx(clean.mean())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--gap-z", "-50"], "gap_z must be >= 0"),
        (["--radius-floor-px", "-5"], "radius floor must be a finite number >= 0"),
        (["--radius-floor-px", "nan"], "radius floor must be a finite number >= 0"),
    ],
)
def test_lm_bad_settings_fail_before_writing(tmp_path, capsys, lm_stack, extra, message):
    dst = tmp_path / "op"
    pair = [str(lm_stack.tif), str(lm_stack.swc)]
    assert main(["data", "lm", str(dst), *pair, *pair[:0], *extra]) == 2
    assert message in _error_line(capsys)
    assert not dst.exists()


def test_lm_swc_outside_its_stack_is_an_error(tmp_path, capsys, lm_stack):
    swc = tmp_path / "far.swc"
    swc.write_text("1 1 5000 5000 500 2 -1\n2 3 5010 5000 500 2 1\n")
    assert main(["data", "lm", str(tmp_path / "op"), str(lm_stack.tif), str(swc)]) == 2
    assert "no node of this reconstruction lies inside its stack" in _error_line(capsys)


# ---------------------------------------------------------------------- blockwise outputs
@pytest.fixture(scope="module")
def affinities(em_dense, tmp_path_factory):
    # fib_medulla_s2 z 100-132, y 0-64, x 0-128 (or the synthetic cube's corner)
    labels = open_volume(em_dense.labels)[em_dense.region][:32, :64, :128]
    url = str(tmp_path_factory.mktemp("affs") / "affinities")
    return write_affinity_layer(url, labels, noise=0.2, seed=1)


def _segment_cli(affinities: str, output, *extra: str) -> int:
    return main(["segment", f"affinities={affinities}", f"output={output}",
                 "block_shape=[32,64,64]", *extra])


def test_segment_rerun_with_another_threshold_refuses_then_equals_a_fresh_run(
    ray_session, affinities, tmp_path, capsys
):
    out, fresh = tmp_path / "seg", tmp_path / "fresh"
    assert _segment_cli(affinities, out, "threshold=0.1") == 0
    low = open_volume(f"{out}/segmentation")[:]
    assert _segment_cli(affinities, out, "threshold=0.9") == 2
    assert "threshold: 0.1 -> 0.9" in _error_line(capsys)
    np.testing.assert_array_equal(open_volume(f"{out}/segmentation")[:], low)
    assert _segment_cli(affinities, out, "threshold=0.9", "overwrite=true") == 0
    assert "agglomerate: 2 blocks (0 already done)" in capsys.readouterr().out
    assert _segment_cli(affinities, fresh, "threshold=0.9") == 0
    high = open_volume(f"{fresh}/segmentation")[:]
    assert len(np.unique(high)) != len(np.unique(low))
    np.testing.assert_array_equal(open_volume(f"{out}/segmentation")[:], high)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["block_shape=[-32,64,64]"], "block_shape"),
        (["block_shape=[0,64,64]"], "block_shape"),
        (["halo=[-1,0,0]"], "halo"),
        (["context=[0,-4,0]"], "context"),
        (["roi=[10,0,0,5,64,64]"], "start < stop"),
        (["roi=[-32,0,0,32,64,64]"], "roi"),
        (["task=nope"], "task"),
        (["output=s3://bucket/seg"], "local folder"),
    ],
)
def test_segment_bad_settings_fail_before_ray_starts(affinities, tmp_path, capsys, extra,
                                                     message):
    out = tmp_path / "seg"
    assert _segment_cli(affinities, out, *extra) == 2
    assert message in _error_line(capsys)
    assert not out.exists()


def test_segment_refuses_a_folder_it_did_not_write(ray_session, affinities, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert _segment_cli(affinities, tmp_path) == 2
    assert "did not write" in _error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


# ---------------------------------------------------------------------- job paths
@pytest.mark.parametrize("name", ["../../../x", "/etc", "a/b", "..", ".hidden"])
def test_run_names_stay_inside_storage_path(tmp_path, capsys, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(json.dumps({"data": {"image": "raw.npy"}}))
    np.save(tmp_path / "raw.npy", np.zeros((8, 8, 8), np.uint8))
    assert main(["pretrain", "mae", "job.yaml", f"run.name={name}"]) == 2
    assert "run.name" in _error_line(capsys)


def test_relative_job_paths_are_resolved_where_the_command_runs(tmp_path, monkeypatch):
    from neuroray.config import load_config
    from neuroray.trainers.finetune import FinetuneJob

    monkeypatch.chdir(tmp_path)
    job = load_config(FinetuneJob, None, [
        "data.image=layers/raw", "data.labels=precomputed://layers/labels",
        "model.init=checkpoint:runs/mae", "run.storage_path=runs",
    ])
    assert job.data.image == str(tmp_path / "layers/raw")
    assert job.data.labels == f"precomputed://{tmp_path}/layers/labels"
    assert job.model.init == f"checkpoint:{tmp_path}/runs/mae"
    assert job.run.storage_path == str(tmp_path / "runs")
    # a worker elsewhere re-validates the JSON it was sent: the paths do not move again
    monkeypatch.chdir("/")
    assert FinetuneJob.model_validate_json(job.model_dump_json()) == job
    remote = load_config(FinetuneJob, None, ["data.image=gs://bucket/raw",
                                             "data.labels=s3://bucket/labels"])
    assert (remote.data.image, remote.data.labels) == ("gs://bucket/raw", "s3://bucket/labels")


def test_missing_inputs_are_named_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    started = ray.is_initialized()
    code = main(["finetune", "em", "configs/none.yaml"])
    assert code == 2 and "does not exist" in _error_line(capsys)
    (tmp_path / "job.yaml").write_text(json.dumps(
        {"data": {"image": "layers/raw", "labels": "layers/labels"},
         "model": {"init": "checkpoint:runs/mae"}}))
    assert main(["finetune", "em", "job.yaml"]) == 2
    line = _error_line(capsys)
    assert "data.image=" in line and "model.init=" in line and str(tmp_path) in line
    assert ray.is_initialized() == started  # failed before any Ray start
