"""What the embedded Ray listens on, and who may talk to it.

During a real embedded run (the session's Ray, started by ``neuroray.runtime.connect``) these
tests list the listening TCP sockets of that Ray's processes, compare them with the README's table
of listeners ("Listeners of the embedded Ray"), and probe every port from each non-loopback
address of this machine with an HTTP GET that carries no credential: nothing may answer. They
also start Ray in subprocesses with authentication turned off, to check that ``connect`` refuses
unless told otherwise (the shared Ray is not disturbed).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "all interfaces"
# Every embedded Ray runs these with at least one listener (the monitor's and the dashboard's
# metrics servers use fixed ports and are absent when another Ray on the machine holds them).
ALWAYS_LISTENING = {"gcs_server", "raylet", "dashboard", "ray::DashboardAgent",
                    "ray::RuntimeEnvAgent", "worker"}  # fmt: skip


@dataclass(frozen=True)
class Listener:
    role: str  # the process, as the README's table names it
    pid: int
    ip: str
    port: int

    @property
    def binds(self) -> str:
        """``127.0.0.1`` for loopback, ``all interfaces`` for 0.0.0.0 / ::, else the address."""
        address = ipaddress.ip_address(self.ip)
        if getattr(address, "ipv4_mapped", None):
            address = address.ipv4_mapped
        if address.is_loopback:
            return LOOPBACK
        if address.is_unspecified:
            return ALL_INTERFACES
        return str(address)


def _role(process: psutil.Process, driver_pid: int) -> str:
    """The README's name for a Ray process."""
    name, cmdline = process.name(), " ".join(process.cmdline())
    if name in ("gcs_server", "raylet"):
        return name
    if "ray/dashboard/dashboard.py" in cmdline or name.startswith("ray-dashboard-"):
        return "dashboard"
    if "ray/autoscaler/_private/monitor.py" in cmdline:
        return "monitor"
    if "ray/_private/log_monitor.py" in cmdline:
        return "log_monitor"
    for agent in ("ray::DashboardAgent", "ray::RuntimeEnvAgent"):
        if cmdline.startswith(agent):
            return agent
    if process.pid == driver_pid or cmdline.startswith("ray::"):
        return "worker"  # the driver and every worker run a core-worker gRPC server
    return f"unknown process {name} ({cmdline[:80]})"


def ray_listeners() -> list[Listener]:
    """The listening TCP sockets of this process (the driver) and every process below it: the
    embedded Ray's GCS, raylet, dashboard, agents and workers are all started from here."""
    driver = psutil.Process()
    processes = {p.pid: p for p in driver.children(recursive=True)}
    processes[driver.pid] = driver
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in processes:
            role = _role(processes[conn.pid], driver.pid)
            found.append(Listener(role, conn.pid, conn.laddr.ip, conn.laddr.port))
    return found


def documented_listeners() -> dict[str, str]:
    """README table "Listeners of the embedded Ray": process name -> where it binds."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^### Listeners of the embedded Ray\n(.*?)(?=^#)", text, re.M | re.S)
    assert section, "README.md lacks the section '### Listeners of the embedded Ray'"
    table = {}
    for line in section[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or set(cells[0]) <= set("-: ") or cells[0] == "process":
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        binds = cells[-1].replace("`", "").split()[0:2]
        where = LOOPBACK if binds[0] == LOOPBACK else " ".join(binds)
        for name in names:
            table[name] = where
    assert table, "the README's listener table has no rows"
    return table


def _external_addresses() -> list[str]:
    """This machine's addresses other than loopback and link-local ones."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = ipaddress.ip_address(entry.address.split("%")[0])
            if not (address.is_loopback or address.is_link_local):
                found.append(str(address))
    return found


def http_get(host: str, port: int, path: str) -> str:
    """``refused``, ``not HTTP`` or ``HTTP <status> <first bytes>`` for a GET with no credential."""
    connection = http.client.HTTPConnection(host, port, timeout=3)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return f"HTTP {response.status} {response.read(60)!r}"
    except ConnectionRefusedError:
        return "refused"
    except (http.client.HTTPException, OSError) as error:  # gRPC (HTTP/2) servers, resets
        return f"not HTTP ({type(error).__name__})"
    finally:
        connection.close()


@pytest.fixture(scope="module")
def listeners(ray_session) -> list[Listener]:
    """The session Ray's listeners, with workers up (a few tasks run first)."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    def ping(i: int) -> int:
        return i

    assert ray.get([ping.remote(i) for i in range(4)]) == [0, 1, 2, 3]
    return ray_listeners()


def test_the_scan_sees_the_embedded_ray(ray_session, listeners):
    """The GCS port the driver talks to, and each always-running process, are in the scan."""
    gcs_host, gcs_port = ray_session.get_runtime_context().gcs_address.rsplit(":", 1)
    assert gcs_host == LOOPBACK
    assert ray_session.util.get_node_ip_address() == LOOPBACK
    assert any(x.role == "gcs_server" and x.port == int(gcs_port) for x in listeners), listeners
    assert ALWAYS_LISTENING <= {x.role for x in listeners}, listeners


def test_every_listener_is_documented_and_binds_where_the_readme_says(listeners):
    documented = documented_listeners()
    undocumented = sorted({x.role for x in listeners} - set(documented))
    assert undocumented == [], f"listeners missing from the README's table: {undocumented}"
    wrong = [(x.role, x.ip, x.port, documented[x.role]) for x in listeners
             if x.binds != documented[x.role]]  # fmt: skip
    assert wrong == [], f"listeners not bound where the README says: {wrong}"
    # the README's all-interface list is exactly what runs on all interfaces
    readme_open = {role for role, where in documented.items() if where != LOOPBACK}
    running_open = {x.role for x in listeners if x.binds != LOOPBACK}
    assert running_open == readme_open


def test_nothing_answers_http_off_host_without_a_credential(listeners):
    """Every listener, probed from every non-loopback address of this machine: no HTTP 200."""
    addresses = _external_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback address to probe from")
    answered, results = [], []
    for listener in listeners:
        for address in addresses:
            for path in ("/metrics", "/api/version"):
                result = http_get(address, listener.port, path)
                results.append((listener.role, listener.port, address, path, result))
                if result.startswith("HTTP 200") or result.startswith("HTTP 3"):
                    answered.append(results[-1])
    assert answered == [], f"answered off-host without a credential: {answered}"
    # and, since the table says 127.0.0.1 for everything, nothing accepts a connection at all
    accepted = [r for r in results if r[-1] != "refused"]
    assert accepted == [], f"accepted a connection on a non-loopback address: {accepted}"


def test_the_dashboard_wants_the_token_even_on_loopback(ray_session):
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray._private.worker import get_dashboard_url

    assert is_token_auth_enabled()
    host, port = get_dashboard_url().rsplit(":", 1)
    assert host == LOOPBACK
    assert http_get(LOOPBACK, int(port), "/api/jobs/").startswith("HTTP 401")


def test_the_auth_token_file_is_private(ray_session):
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists():
        pytest.skip("the token came from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, not the file")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


# ---------------------------------------------------------------------- authentication off
_START = """
import ray
from neuroray.errors import NeurorayError
from neuroray.runtime import connect
try:
    connect(num_cpus=1, object_store_mb=128, log_to_driver=False)
except NeurorayError as error:
    print(f"{type(error).__name__}: {error}")
    raise SystemExit(2 if not ray.is_initialized() else 3)
from ray._private.authentication.authentication_utils import is_token_auth_enabled
print("started", ray.util.get_node_ip_address(), "token" if is_token_auth_enabled() else "none")
ray.shutdown()
"""


def _start_in_subprocess(**env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    environment.pop("NEURORAY_ALLOW_UNAUTHENTICATED_RAY", None)
    environment.update(env)
    return subprocess.run([sys.executable, "-c", _START], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=240)  # fmt: skip


def test_connect_refuses_an_embedded_ray_without_authentication():
    done = _start_in_subprocess(RAY_AUTH_MODE="disabled")
    assert done.returncode == 2, done.stdout + done.stderr  # refused before Ray started
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("RayAuthError: RAY_AUTH_MODE=disabled")
    assert "NEURORAY_ALLOW_UNAUTHENTICATED_RAY=1" in lines[0]


@pytest.mark.slow
def test_connect_starts_without_authentication_only_when_told():
    done = _start_in_subprocess(RAY_AUTH_MODE="disabled", NEURORAY_ALLOW_UNAUTHENTICATED_RAY="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"started {LOOPBACK} none"


# ---------------------------------------------------------------------- what neuroray loads
class _Planted:
    """Unpickling this creates a file: the stand-in for code planted in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_rl_checkpoints_with_pickled_state_are_refused_unread(tmp_path):
    import pickle

    from neuroray.agents.policy_io import check_rl_checkpoint_unpickled
    from neuroray.trainers.dbmim import DbMiMError

    checkpoint = tmp_path / "rl" / "checkpoint_000004"
    learner = checkpoint / "learner_group" / "learner"
    learner.mkdir(parents=True)
    (learner / "state.msgpack").write_bytes(b"\x80")  # msgpack state: what neuroray writes
    (checkpoint / "class_and_ctor_args.pkl").write_bytes(b"")  # RLlib's, not read on restore
    check_rl_checkpoint_unpickled(checkpoint)  # accepted

    marker = tmp_path / "planted_code_ran"
    module = learner / "rl_module" / "shared"
    module.mkdir(parents=True)
    (module / "module_state.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(DbMiMError, match=r"pickled state \(learner_group/learner/rl_module"):
        check_rl_checkpoint_unpickled(checkpoint)
    assert not marker.exists()


def test_msgpack_checkpoints_leave_rays_serialisation_alone(ray_session):
    """RLlib's msgpack checkpoints patch ``msgpack`` process-wide (``msgpack_numpy.patch()``),
    and Ray serialises with it: an actor that wrote one would then send numpy arrays as dicts.
    dbMiM writes and reads them inside ``msgpack_checkpoint_io``, which undoes the patch."""
    import numpy as np

    ray = ray_session

    @ray.remote(num_cpus=0)
    def kind(value) -> str:
        return type(value[0]).__name__

    @ray.remote(num_cpus=0)
    class Saver:
        def send_after_patch(self, guarded: bool) -> str:
            from ray.rllib.utils.checkpoints import try_import_msgpack

            from neuroray.agents.policy_io import msgpack_checkpoint_io

            if guarded:
                with msgpack_checkpoint_io():
                    try_import_msgpack(error=True)  # what RLlib's save / restore call
            else:
                try_import_msgpack(error=True)
            return ray.get(kind.remote([np.zeros((2, 3), np.uint8)]))

    guarded, bare = Saver.remote(), Saver.remote()
    try:
        assert ray.get(guarded.send_after_patch.remote(True)) == "ndarray"
        assert ray.get(bare.send_after_patch.remote(False)) == "dict"  # the hazard is real
    finally:
        for actor in (guarded, bare):
            ray.kill(actor)
