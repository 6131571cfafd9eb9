"""Connect to Ray: an embedded local instance by default, a cluster when an address is given.

The embedded Ray is **localhost only**: its node address is 127.0.0.1, which makes Ray 2.60 bind
every listener it starts (GCS, raylet, object manager, worker gRPC, dashboard agent, runtime-env
agent, metrics export, dashboard) to the loopback interface, and it runs with token
authentication on. Nothing on another machine can reach it. A cluster that other machines join is
started with ``ray start`` (see cluster/README.md), never by ``connect()``.

The dashboard stays on (on 127.0.0.1): without it Ray's State API is missing and Tune over Train
hangs (see RAY_NOTES.md). Train's report poll is shortened for local runs, where the default 2 s
poll pads every short step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from neuroray.errors import NeurorayError

if TYPE_CHECKING:
    from neuroray.config import RaySettings

log = logging.getLogger(__name__)

# Train V2 polls workers every 2 s by default, which pads short steps; 0.2 s is plenty locally.
_LOCAL_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}

#: Set to 1 to start an embedded Ray although ``RAY_AUTH_MODE`` turns authentication off.
ALLOW_UNAUTHENTICATED_ENV = "NEURORAY_ALLOW_UNAUTHENTICATED_RAY"
_AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's own switch: unset or "token" = token auth (2.60 default)
# Ray's switch for multi-node clusters; off (as on macOS / Windows) it puts the node on 127.0.0.1.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayAuthError(NeurorayError):
    """An embedded Ray would run without token authentication and the user did not allow it."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _check_auth_mode(allow_unauthenticated: bool) -> bool:
    """Refuse an embedded Ray with authentication off unless allowed; True when auth is off."""
    mode = os.environ.get(_AUTH_MODE_ENV)
    if mode is None or mode.strip().lower() == "token":
        return False
    if not (allow_unauthenticated or _truthy(os.environ.get(ALLOW_UNAUTHENTICATED_ENV))):
        raise RayAuthError(
            f"{_AUTH_MODE_ENV}={mode} would start Ray without authentication: unset it (token "
            f"auth is the default) or set {ALLOW_UNAUTHENTICATED_ENV}=1 to accept the risk"
        )
    log.warning("starting an embedded Ray WITHOUT authentication (%s=%s)", _AUTH_MODE_ENV, mode)
    return True


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While Ray starts, make it choose 127.0.0.1 as this node's address.

    ``ray.init(_node_ip_address="127.0.0.1")`` does not do it: ray.init replaces a loopback
    address with the machine's external one. Ray picks the loopback address itself when its
    multi-node switch is off (its default on macOS and Windows); the switch is read once, at
    import, into ``ray_constants.ENABLE_RAY_CLUSTER``, so both the constant (this process) and
    the environment variable (the processes Ray starts) are set, and restored afterwards.
    """
    from ray._private import ray_constants

    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    saved_env = os.environ.get(_CLUSTER_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_CLUSTER_ENV] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = saved_env


def _private_token_file() -> None:
    """Ray writes ``~/.ray/auth_token`` with the umask's permissions (often 0644): make it 0600."""
    path = Path.home() / ".ray" / "auth_token"
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(0o600)
            log.info("made %s private (was %o, now 600)", path, mode)
    except OSError:
        pass  # absent (token from RAY_AUTH_TOKEN) or not ours: nothing to tighten


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_mb: int | None = 512,
    log_to_driver: bool = True,
    allow_unauthenticated: bool = False,
) -> dict:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start an embedded one.

    The embedded Ray listens on 127.0.0.1 only and requires Ray's auth token; with
    ``RAY_AUTH_MODE`` set to anything but ``token`` it is refused (:class:`RayAuthError`) unless
    ``allow_unauthenticated`` or ``NEURORAY_ALLOW_UNAUTHENTICATED_RAY=1`` says so.
    Idempotent: when Ray is already initialised in this process it is reused as it is.
    Returns the cluster's resources.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver)
        return ray.cluster_resources()

    unauthenticated = _check_auth_mode(allow_unauthenticated)
    for key, value in _LOCAL_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    with _loopback_node():
        ray.init(
            # "local": always a new Ray; without it, ray.init joins whatever `ray start` (or a
            # multi-node test cluster) last ran on this host and then refuses num_cpus
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
            log_to_driver=log_to_driver,
            runtime_env={"env_vars": dict(_LOCAL_ENV_DEFAULTS)},
        )
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":  # a Ray that ignores the switch would listen on the network
        ray.shutdown()
        raise NeurorayError(
            f"the embedded Ray chose node address {node_ip}, not 127.0.0.1: refusing to run it"
        )
    if not unauthenticated:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        if not is_token_auth_enabled():
            ray.shutdown()
            raise RayAuthError(
                "the embedded Ray started without token authentication: unset RAY_AUTH_MODE "
                f"or set {ALLOW_UNAUTHENTICATED_ENV}=1 to accept the risk"
            )
        _private_token_file()
    return ray.cluster_resources()


def connect_to(ray_config: RaySettings, **options: Any) -> dict:
    """:func:`connect` as a job's ``ray:`` section says (address, CPUs, object store).

    Every job that starts Ray work connects through this, so what ``RaySettings`` means is
    written once; ``options`` are :func:`connect`'s other keywords (``log_to_driver``, ...).
    """
    return connect(
        ray_config.address,
        num_cpus=ray_config.num_cpus,
        object_store_mb=ray_config.object_store_mb,
        **options,
    )


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
