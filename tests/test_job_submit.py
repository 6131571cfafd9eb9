"""A neuroray job submitted with `ray job submit` to a head started with `ray start --head`.

This module starts its own head and does not use the ``ray_session`` fixture. The head gets its
own ports and temp dir, so it runs beside the session's Ray (and other Rays on a shared machine).
It is stopped the way `ray stop` would stop it, but only it: `ray stop` ends every Ray process of
the machine, so the head runs as ``ray start --block`` in its own process group, and the finally
sends that process SIGTERM (it shuts down its Ray processes) and then kills its group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuroray.models.checkpoint import load_model_checkpoint
from neuroray.platform.ingest import ingest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
PORT_FLAGS = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "ray-client-server-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


try:  # loaded before any fork: the child below only calls into it
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """Linux: the head gets SIGTERM if the test process dies before its finally runs."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_head(head: subprocess.Popen, grace_s: float = 60) -> None:
    """`ray stop` for this head only: SIGTERM to `ray start --block`, then its process group."""
    with contextlib.suppress(ProcessLookupError):
        head.terminate()
    try:
        head.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(head.pid, signal.SIGKILL)  # anything of this head still alive
    head.wait(timeout=30)


@contextlib.contextmanager
def local_head(log: Path, num_cpus: int = 2) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head on 127.0.0.1 with the dashboard on; yields (dashboard URL, client env)."""
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    temp_dir = tempfile.mkdtemp(prefix="nr-ray-", dir="/tmp")  # short: socket paths are capped
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",  # the client sends ~/.ray/auth_token, which `ray start` made
        "RAY_ADDRESS": f"127.0.0.1:{ports['port']}",  # this head, not another Ray on the machine
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    command = [
        RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
        *(f"--{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    with log.open("w") as out:
        head = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited with {head.returncode}:\n{log.read_text()}")
            if _ray(env, "job", "list", "--address", url).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the head's job server never answered at {url}:\n{log.read_text()}")
            time.sleep(1)
        yield url, env
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(
    env: dict[str, str], url: str, job_id: str, entrypoint: list[str], timeout_s: float = 180
) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job server has no agent registered yet (the
    server answers `ray job list` a few seconds before its dashboard agent can take a job)."""
    deadline = time.monotonic() + timeout_s
    while True:
        submit = _ray(
            env, "job", "submit", "--address", url, "--submission-id", job_id, "--no-wait",
            "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint,
        )  # fmt: skip
        not_ready = "No available agent" in submit.stdout + submit.stderr
        if submit.returncode == 0 or not not_ready or time.monotonic() > deadline:
            return submit
        time.sleep(2)


def _job_status(env: dict[str, str], url: str, job_id: str) -> str:
    """The job's state as `ray job status` words it ("Job 'x' succeeded", "Status for job 'x':
    RUNNING")."""
    out = _ray(env, "job", "status", job_id, "--address", url).stdout
    final = re.search(rf"Job '{re.escape(job_id)}' (succeeded|failed|was stopped)", out)
    if final:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[final[1]]
    current = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", out)
    return current[1] if current else "UNKNOWN"


def _wait_for(env: dict[str, str], url: str, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _job_status(env, url, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    return "TIMEOUT"


@pytest.mark.flaky(reruns=1)  # a whole cluster run: one rerun, reported as R
@pytest.mark.slow
def test_pretrain_job_submitted_to_a_local_head_succeeds(em_volume, tmp_path):
    raw = str(tmp_path / "raw")
    ingest(em_volume.raw, raw, chunk_shape=(25, 50, 100), progress=False)
    runs = tmp_path / "runs"
    job_id = f"neuroray-test-{uuid.uuid4().hex[:8]}"
    entrypoint = [
        "neuroray", "pretrain", "mae", "configs/pretrain_mae.yaml",
        f"data.image={raw}", "data.num_servers=1", "data.cache_mb=32",
        "model.encoder.width=32", "model.encoder.depth=1", "model.encoder.heads=2",
        "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2",
        "run.name=submitted_mae", f"run.storage_path={runs}", "run.steps=3", "run.batch_size=1",
        "run.checkpoint_every=3", "run.report_every=3", "run.preview_every=3",
    ]  # fmt: skip

    with local_head(tmp_path / "head.log") as (url, env):
        # token authentication stays on: a client that does not send the token is refused
        anonymous = {**env, "RAY_AUTH_MODE": "disabled"}
        anonymous.pop("RAY_AUTH_TOKEN", None)
        refused = _ray(anonymous, "job", "list", "--address", url)
        assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

        submit = _submit(env, url, job_id, entrypoint)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        status = _wait_for(env, url, job_id, timeout_s=300)
        logs = _ray(env, "job", "logs", job_id, "--address", url).stdout
        assert status == "SUCCEEDED", logs[-4000:]

    assert '"checkpoint":' in logs  # the CLI's report, printed by the job
    # progress as lines (no terminal), with step/total and ETA; Train's raw report lines gone
    assert "[submitted_mae] step 3/3 (100%)" in logs and "ETA" in logs, logs[-4000:]
    assert "TrainingReport(" not in logs and "Reporting training result" not in logs
    checkpoint = load_model_checkpoint(runs / "submitted_mae")
    assert checkpoint["kind"] == "mae" and checkpoint["step"] == 3
