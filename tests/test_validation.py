"""Bad input ends in one line and exit 2, before any work starts, with nothing half-written.

Each test drives the real command (``neuroray.cli.main`` or a subprocess) on tiny real files
written in ``tmp_path``. No test reaches the network: remote URLs are either refused by a
credentials check that reads only files and the environment, or point at 127.0.0.1:9 (refused
at once).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from neuroray.cli import main
from neuroray.config import load_config
from neuroray.errors import ConfigError, VolumeError
from neuroray.platform.ingest import ingest
from neuroray.platform.remote import check_url_scheme
from neuroray.platform.volume import create_volume, open_volume

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with a single ``neuroray: error:`` line naming ``needles``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuroray: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def layer(path: Path, data: np.ndarray, **spec) -> str:
    """A precomputed layer written with the project's own create_volume."""
    volume = create_volume(path, shape=data.shape, dtype=data.dtype, chunk_shape=(8, 8, 8), **spec)
    volume[:] = data
    return str(path)


# ---------------------------------------------------------------------- 1. data info of files
def test_data_info_of_a_tiff_and_an_npy(capsys, tmp_path):
    tif, npy = tmp_path / "OP_1.tif", tmp_path / "x.npy"
    tifffile.imwrite(tif, np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8))
    np.save(npy, np.ones((3, 5, 7), dtype=np.float32))
    for path, fmt, shape in ((tif, "tiff", [4, 8, 8]), (npy, "npy", [3, 5, 7])):
        assert main(["data", "info", str(path)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == fmt and info["shape_zyx"] == shape
        assert "manifest" not in info


# ---------------------------------------------------------------------- 2. NaN / Inf in JSON
def _no_constants(name: str):
    raise AssertionError(f"invalid JSON constant {name}")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_data_info_of_non_finite_image_prints_valid_json(capsys, tmp_path, bad):
    data = np.full((8, 8, 8), bad, dtype=np.float32)
    np.save(tmp_path / "src.npy", data)
    dst = str(tmp_path / "layer")
    ingest(str(tmp_path / "src.npy"), dst, chunk_shape=(8, 8, 8), labels=False, progress=False)
    assert main(["data", "info", dst]) == 0
    out = capsys.readouterr().out
    info = json.loads(out, parse_constant=_no_constants)  # NaN / Infinity are not JSON
    assert info["manifest"]["chunks"] == 1
    assert info["manifest"]["mean_intensity"] is None


# ---------------------------------------------------------------------- 3. remote URLs offline
def _offline_env(tmp_path: Path) -> dict[str, str]:
    """No credentials anywhere, no metadata servers, no proxies: nothing can leave the machine."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    drop = ("AWS_", "GOOGLE_", "GCE_", "CLOUDSDK_", "CLOUD_VOLUME", "CLOUD_FILES", "GCLOUD")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(drop) and "proxy" not in k.lower()
    }
    env.update(
        HOME=str(home),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(home / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
        NO_GCE_CHECK="true",
        NO_PROXY="*",
        PYTHONPATH=str(REPO),
    )
    return env


# Imports first (cloudvolume, boto3, google-auth), so the timed part is the open alone.
_TIMED_CLI = """
import sys, time
import cloudvolume, boto3, google.auth, requests  # noqa: F401
from neuroray.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
print(f"{time.perf_counter() - started:.2f}")
sys.exit(code)
"""


def _run_offline(tmp_path: Path, *argv: str) -> tuple[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _TIMED_CLI, *argv],
        capture_output=True,
        text=True,
        env=_offline_env(tmp_path),
        cwd=tmp_path,
        timeout=240,
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr
    assert err.startswith("neuroray: error:") and err.count("\n") == 1, err
    return err, float(done.stdout.split()[-1])


@pytest.mark.parametrize(
    "url,needles",
    [
        ("s3://neuroray-test-no-such-bucket/raw", ("AWS_ACCESS_KEY_ID", "aws-secret.json")),
        ("precomputed://s3://neuroray-test-no-such-bucket/raw", ("AWS_SECRET_ACCESS_KEY",)),
        ("gs://neuroray-test-no-such-bucket/raw", ("GOOGLE_APPLICATION_CREDENTIALS",)),
        ("http://127.0.0.1:9/raw", ("cannot reach", "127.0.0.1:9")),
    ],
)
def test_remote_sources_without_credentials_or_network_fail_fast(tmp_path, url, needles):
    err, seconds = _run_offline(tmp_path, "data", "info", url)
    for needle in needles:
        assert needle in err, err


def test_remote_destination_without_credentials_writes_nothing(tmp_path):
    np.save(tmp_path / "src.npy", np.zeros((4, 8, 8), np.uint8))
    before = sorted(p.name for p in tmp_path.iterdir())
    err, seconds = _run_offline(
        tmp_path, "data", "ingest", "src.npy", "s3://neuroray-test-no-such-bucket/raw"
    )
    assert "AWS_ACCESS_KEY_ID" in err
    # (home/ is the empty HOME the offline environment gives the command)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == before


@pytest.mark.parametrize(
    "scheme,package,extra", [("s3", "s3fs", "neuroray[s3]"), ("gs", "gcsfs", "neuroray[gcs]")]
)
def test_zarr_in_a_bucket_names_the_extra_to_install(capsys, monkeypatch, scheme, package, extra):
    import importlib.util

    find_spec = importlib.util.find_spec  # dev installs may have it (ome-zarr brings s3fs): hide it
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == package else find_spec(name, *a),
    )
    url = f"zarr://{scheme}://neuroray-test-no-such-bucket/raw.zarr"
    one_line_error(capsys, ["data", "info", url], f"pip install '{extra}'")
    with pytest.raises(VolumeError, match=package):
        create_volume(url, shape=(4, 4, 4), dtype="uint8")


def test_extras_for_bucket_backends_are_declared():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(req.startswith("s3fs>=") and "<" in req for req in extras["s3"])
    assert any(req.startswith("gcsfs>=") and "<" in req for req in extras["gcs"])


# ---------------------------------------------------------------------- 4. URL scheme allow-list
def test_unknown_url_scheme_is_refused_and_writes_no_local_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "src.npy", np.zeros((4, 8, 8), np.uint8))
    err = one_line_error(
        capsys, ["data", "ingest", "src.npy", "ftp://host/raw"], "ftp://", "s3://", "gs://"
    )
    assert "precomputed://" in err and "https://" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npy"]  # no ./ftp:/host/raw
    one_line_error(capsys, ["data", "info", "xyz://host/raw"], "unsupported URL scheme xyz://")
    one_line_error(capsys, ["data", "ingest", "ftp://host/a.npy", "out"], "ftp://")
    assert not (tmp_path / "out").exists()
    with pytest.raises(VolumeError, match="unsupported URL scheme ftp://"):
        create_volume("precomputed://ftp://host/raw", shape=(4, 4, 4), dtype="uint8")
    with pytest.raises(VolumeError, match="unsupported URL scheme memory://"):
        open_volume("zarr://memory://x.zarr")


def test_allowed_schemes_pass_the_check():
    for url in (
        "/data/raw",
        "raw.zarr",
        "cube.h5#raw",
        "file:///data/raw",
        "precomputed://file:///data/raw",
        "precomputed://gs://bucket/raw",
        "gs://bucket/raw",
        "s3://bucket/raw",
        "https://host/raw",
        "http://host/raw",
        "zarr://s3://bucket/raw.zarr",
        "zarr3://gs://bucket/raw.zarr",
    ):
        check_url_scheme(url)


# ---------------------------------------------------------------------- 5. corrupt or empty files
@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"\x86\xff\x00binary", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (None, "no scales"),  # a valid info whose scales list is empty
    ],
)
def test_corrupt_precomputed_info_is_one_line(capsys, tmp_path, content, needle):
    path = tmp_path / "layer"
    layer(path, np.zeros((8, 8, 8), np.uint8))
    info = json.loads((path / "info").read_text())
    if content is None:
        content = json.dumps({**info, "scales": []}).encode()
    (path / "info").write_bytes(content)
    one_line_error(capsys, ["data", "info", str(path)], needle)


def test_malformed_tiff_is_one_line(capsys, tmp_path):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.ones((3, 8, 8), np.uint8))
    bad = tmp_path / "bad.tif"
    header = good.read_bytes()[:4]  # a TIFF signature, then a first-page offset past the end
    bad.write_bytes(header + b"\xff\xff\xff\x7f" + bytes(range(256)))
    one_line_error(capsys, ["data", "info", str(bad)], "not a readable TIFF")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(good.read_bytes()[:100])
    one_line_error(capsys, ["data", "info", str(truncated)], "not a readable TIFF")


def test_zero_sized_sources_are_refused_before_a_destination_exists(capsys, tmp_path):
    import h5py

    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8), np.uint8))
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["raw"] = np.zeros((4, 0, 8), np.uint8)
    for src in (tmp_path / "empty.npy", f"{tmp_path / 'empty.h5'}#raw"):
        one_line_error(capsys, ["data", "info", str(src)], "empty")
        dst = tmp_path / "dst"
        one_line_error(capsys, ["data", "ingest", str(src), str(dst)], "empty")
        assert not dst.exists()  # no info / provenance left for a rerun to trip over
    with pytest.raises(VolumeError, match="empty"):
        create_volume(tmp_path / "zero", shape=(4, 0, 4), dtype="uint8")
    assert not (tmp_path / "zero").exists()


# ---------------------------------------------------------------------- 6. evaluate arguments
@pytest.fixture
def seg_and_labels(tmp_path):
    labels = np.zeros((8, 16, 16), np.uint32)
    labels[:, :8], labels[:, 8:] = 1, 2
    return (
        layer(tmp_path / "seg", labels.copy(), layer_type="segmentation"),
        layer(tmp_path / "gt", labels, layer_type="segmentation"),
    )


def test_evaluate_runs_on_valid_arguments(capsys, tmp_path, seg_and_labels):
    seg, gt = seg_and_labels
    image = layer(tmp_path / "image", np.ones((8, 16, 16), np.uint8))
    out = tmp_path / "eval"
    argv = ["evaluate", seg, gt, "--image", image, "--out", str(out), "--border-nm", "0"]
    assert main([*argv, "--roi", "0,0,0,8,16,16"]) == 0
    assert "voi" in capsys.readouterr().out and (out / "metrics.json").is_file()


def test_evaluate_refuses_bad_arguments_before_any_work(capsys, tmp_path, seg_and_labels):
    seg, gt = seg_and_labels
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    one_line_error(capsys, ["evaluate", seg, gt, "--out", str(taken)], "--out", "is a file")
    assert taken.read_text() == "keep me"

    small = layer(tmp_path / "small", np.ones((8, 8, 8), np.uint8))
    out = tmp_path / "eval"
    one_line_error(
        capsys, ["evaluate", seg, gt, "--image", small, "--out", str(out)], "--image", "shape"
    )
    assert not out.exists()  # checked before anything was written

    for value in ("-5", "nan", "inf"):
        one_line_error(capsys, ["evaluate", seg, gt, "--border-nm", value], "--border-nm")
    one_line_error(capsys, ["evaluate", seg, gt, "--roi", "4,0,0,2,16,16"], "--roi", "stop")
    one_line_error(capsys, ["evaluate", seg, gt, "--roi", "0,0,0,0,16,16"], "--roi", "stop")
    one_line_error(capsys, ["evaluate", seg, gt, "--roi", "0,0,0,8,16,99"], "--roi", "outside")


# ---------------------------------------------------------------------- 7. sampler fractions
# (a threshold no crop reaches stops the stream with advice: tests/platform/test_sampler.py)
def test_sampler_fractions_must_lie_in_zero_one():
    from neuroray.trainers.finetune import JOB_CLASS

    config = REPO / "configs" / "finetune_em.yaml"
    for value in ("2.5", "-0.1"):
        with pytest.raises(ConfigError, match="min_foreground"):
            load_config(JOB_CLASS, config, [f"data.sampler.min_foreground={value}"])
    with pytest.raises(ConfigError, match="crop_shape"):
        load_config(JOB_CLASS, config, ["data.sampler.crop_shape=[0,64,64]"])
    with pytest.raises(ConfigError, match="roi"):
        load_config(JOB_CLASS, config, ["data.sampler.roi=[0,0,0,0,250,250]"])
    job = load_config(JOB_CLASS, config, ["data.sampler.min_foreground=1.0"])
    assert job.data.sampler.min_foreground == 1.0


# ---------------------------------------------------------------------- 8. hostile YAML
def test_hostile_yaml_configs_are_one_line(capsys, tmp_path):
    selfref = tmp_path / "selfref.yaml"
    selfref.write_text("run: &r {name: *r}\n")
    one_line_error(capsys, ["pretrain", "mae", str(selfref)], "anchors and aliases")

    levels = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 7):  # small enough that an unguarded loader finishes, just wrong
        levels.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    one_line_error(capsys, ["pretrain", "mae", str(bomb)], "anchors and aliases")

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    one_line_error(capsys, ["pretrain", "mae", str(binary)], "not a UTF-8 text file")

    big = tmp_path / "big.yaml"
    big.write_text("run: {name: " + "x" * (2 << 20) + "}\n")
    one_line_error(capsys, ["pretrain", "mae", str(big)], "larger than")

    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [1, 2\n")
    one_line_error(capsys, ["pretrain", "mae", str(broken)], "not valid YAML")


# ---------------------------------------------------------------------- 9. pickled 2D weights
class _Pickled:
    """Any class makes torch.save write a pickled global, which weights_only refuses."""


def test_2d_checkpoint_with_pickled_globals_is_refused(tmp_path):
    import timm
    from safetensors.torch import save_file

    from neuroray.models.transfer import encoder_from_2d, load_vit2d
    from neuroray.models.vit3d import ModelError

    model = timm.models.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=1, num_classes=0
    )
    pickled = tmp_path / "vit.pth"
    torch.save({"state_dict": model.state_dict(), "extra": _Pickled()}, pickled)
    for load in (
        lambda: load_vit2d(f"file:{pickled}"),
        lambda: encoder_from_2d(f"file:{pickled}", (4, 32, 32), (4, 16, 16)),
    ):
        with pytest.raises(ModelError, match="not a weights-only checkpoint") as raised:
            load()
        assert "\n" not in str(raised.value) and "_Pickled" in str(raised.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelError, match="not a readable checkpoint"):
        load_vit2d(f"file:{garbage}")
    # plain tensors still load, from .pth and .safetensors
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ok.pth")
    save_file(model.state_dict(), str(tmp_path / "ok.safetensors"))
    for name in ("ok.pth", "ok.safetensors"):
        loaded = load_vit2d(f"file:{tmp_path / name}", num_heads=1)
        assert loaded.model.embed_dim == 64


# ---------------------------------------------------------------------- 10. demo --fresh
def test_demo_fresh_never_deletes_a_folder_it_did_not_make(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("not the demo's")
    started = time.monotonic()
    done = subprocess.run(  # a subprocess with a timeout: the old code went on to run the demo
        [sys.executable, "-m", "neuroray.cli", "demo", "--fresh", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("neuroray: error:") and done.stderr.count("\n") == 1
    assert "--fresh" in done.stderr and time.monotonic() - started < 120
    assert keep.read_text() == "not the demo's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_demo_marks_its_folder_and_fresh_empties_only_that(tmp_path):
    from neuroray.demo import DEMO_MARKER, prepare_out

    out = tmp_path / "demo_out"
    prepare_out(out, fresh=False)
    assert (out / DEMO_MARKER).is_file()
    (out / "stale.txt").write_text("from an earlier run")
    prepare_out(out, fresh=False)  # a rerun resumes: nothing deleted
    assert (out / "stale.txt").is_file()
    prepare_out(out, fresh=True)
    assert sorted(p.name for p in out.iterdir()) == [DEMO_MARKER]
    with pytest.raises(ConfigError, match="is a file"):
        prepare_out(tmp_path / "demo_out" / DEMO_MARKER, fresh=True)


def test_finetune_with_pickled_2d_weights_fails_before_ray_starts(tmp_path, capsys, monkeypatch):
    """The CLI checks model.init's weights file in the driver: one line, exit 2, no Ray."""
    import ray
    import timm

    monkeypatch.chdir(tmp_path)
    model = timm.models.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=1, num_classes=0
    )
    torch.save({"state_dict": model.state_dict(), "extra": _Pickled()}, tmp_path / "vit.pth")
    np.save(tmp_path / "raw.npy", np.zeros((16, 64, 64), np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros((16, 64, 64), np.uint32))
    (tmp_path / "job.yaml").write_text(
        "data: {image: raw.npy, labels: labels.npy, sampler: {crop_shape: [16, 64, 64]}}\n"
        "model: {encoder: {img_size: [16, 64, 64]}}\n"
    )
    started = ray.is_initialized()
    one_line_error(
        capsys,
        ["finetune", "lm", "job.yaml", "model.init=file:vit.pth"],
        "not a weights-only checkpoint",
    )
    assert ray.is_initialized() == started
