"""A multi-node Ray cluster on one machine, its nodes made from a cluster file's node types.

``ray.cluster_utils.Cluster`` starts real raylets in this machine: each is its own Ray node with
its own object store, resources and worker processes, so placement by resource, node loss
(``remove``) and objects crossing nodes behave as on a cloud cluster. :class:`LocalCluster`
builds its nodes from the ``available_node_types`` of a launcher YAML (``cluster/aws.yaml``,
``cluster/gcp.yaml``), so tests, drills and benchmarks use the resource names the real cluster
uses, never a copy of them.

What a node type declares is what it gets, with two exceptions, both said here:

- **Detected resources.** AWS nodes leave CPU / GPU to be detected from the instance type
  (Ray's AWS provider asks EC2); :data:`DETECTED` holds what it would find for the instance
  types neuroray's files name. Declared resources win over detected ones, as in Ray.
- **CPUs are scaled to the host.** A laptop cannot run four 8-vCPU nodes, so each node gets
  ``min(its CPUs, cpus_per_node)`` logical CPUs (the head keeps its 0). GPUs stay logical
  resources: a ``GPU`` node places GPU-requesting work without a real GPU behind it.

Every listener is on 127.0.0.1 (as :func:`neuroray.runtime.connect`), with Ray's token auth.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neuroray.errors import NeurorayError

#: CPU / GPU Ray's cloud providers detect for the instance types the cluster files name
#: (AWS instance specs; GCP files state their resources, so they need no entry).
DETECTED: dict[str, dict[str, float]] = {
    "m6i.2xlarge": {"CPU": 8},
    "r6i.2xlarge": {"CPU": 8},
    "g5.2xlarge": {"CPU": 8, "GPU": 1},
}


@dataclass(frozen=True)
class NodeType:
    """One entry of ``available_node_types``: its resources (declared over detected) and limits."""

    name: str
    resources: dict[str, float]
    min_workers: int = 0
    max_workers: int = 0
    instance_type: str | None = None

    @property
    def custom(self) -> dict[str, float]:
        """Resources other than CPU / GPU / memory: the names work is placed by."""
        return {
            k: v for k, v in self.resources.items()
            if k not in ("CPU", "GPU", "memory", "object_store_memory")
        }  # fmt: skip


@dataclass(frozen=True)
class ClusterSpec:
    """The node types of a cluster file and which one is the head."""

    path: str
    head: str
    types: dict[str, NodeType]
    idle_timeout_minutes: float = 5.0
    max_workers: int = 0

    def with_resource(self, resource: str) -> list[NodeType]:
        """Worker node types offering ``resource`` (e.g. ``chunk_server``, ``GPU``), in file order."""
        return [
            t for name, t in self.types.items()
            if name != self.head and t.resources.get(resource, 0) > 0 and t.max_workers > 0
        ]  # fmt: skip


def read_cluster_file(path: str | Path) -> ClusterSpec:
    """Node types of a Ray launcher YAML, with detected CPU / GPU filled in where not declared."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
        types_config = config["available_node_types"]
        head = config["head_node_type"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise NeurorayError(f"{path}: not a Ray cluster launcher file ({err})") from None
    types = {}
    for name, spec in types_config.items():
        node_config = spec.get("node_config") or {}
        instance = node_config.get("InstanceType") or node_config.get("machineType")
        declared = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        types[name] = NodeType(
            name=name,
            resources={**DETECTED.get(instance, {}), **declared},
            min_workers=int(spec.get("min_workers", 0)),
            max_workers=int(spec.get("max_workers", 0)),
            instance_type=instance,
        )
    if head not in types:
        raise NeurorayError(f"{path}: head_node_type {head!r} is not among {sorted(types)}")
    return ClusterSpec(
        str(path),
        head,
        types,
        idle_timeout_minutes=float(config.get("idle_timeout_minutes", 5)),
        max_workers=int(config.get("max_workers", 0)),
    )


def host_resources(node_type: NodeType, cpus_per_node: float) -> dict[str, float]:
    """A node type's resources as one simulated node on this host gets them (CPUs capped)."""
    resources = dict(node_type.resources)
    if resources.get("CPU", 0) > 0:
        resources["CPU"] = float(min(resources["CPU"], cpus_per_node))
    resources.setdefault("CPU", float(cpus_per_node))
    return resources


def _node_args(resources: Mapping[str, float], object_store_mb: int) -> dict[str, Any]:
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    return {
        "num_cpus": int(resources.get("CPU", 0)),
        "num_gpus": int(resources.get("GPU", 0)),
        "resources": custom,
        "object_store_memory": object_store_mb * 2**20,
    }


@dataclass
class SimNode:
    """A started node: its type, its Ray node id, and the handle ``remove`` needs."""

    type: str
    node_id: str
    handle: Any = field(repr=False)


class LocalCluster:
    """Real raylets on this machine, one per added node, typed by a cluster file::

        with LocalCluster("cluster/aws.yaml") as cluster:   # the head, driver connected
            chunk = cluster.add("chunk_servers")
            train = cluster.add("gpu_train")
            ...
            cluster.remove(chunk)                            # the node dies with its processes

    Leaving the block disconnects the driver and stops every node it started, however it ends.
    """

    def __init__(
        self,
        cluster_file: str | Path,
        *,
        cpus_per_node: float = 1,
        object_store_mb: int = 80,
        dashboard: bool = False,
        system_config: dict[str, Any] | None = None,
    ) -> None:
        self.spec = read_cluster_file(cluster_file)
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.dashboard = dashboard
        self.system_config = system_config or {}
        self.nodes: list[SimNode] = []
        self._cluster: Any = None
        self._loopback: Any = None

    # -------------------------------------------------------------- lifetime
    def __enter__(self) -> LocalCluster:
        import ray
        from ray.cluster_utils import Cluster

        from neuroray.runtime import _loopback_node

        if ray.is_initialized():
            raise NeurorayError("LocalCluster needs a process without Ray: ray.shutdown() first")
        self._loopback = _loopback_node()  # every node listens on 127.0.0.1 only
        self._loopback.__enter__()
        try:
            head_type = self.spec.types[self.spec.head]
            args = _node_args(host_resources(head_type, self.cpus_per_node), self.object_store_mb)
            args.update(
                include_dashboard=self.dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=_free_ports(1)[0],  # 8265 may be another Ray's on this host
                node_ip_address="127.0.0.1",
            )
            if self.system_config:
                args["_system_config"] = self.system_config
            self._cluster = Cluster(initialize_head=True, head_node_args=args)
            self.nodes.append(SimNode(head_type.name, self._cluster.head_node.node_id,
                                      self._cluster.head_node))  # fmt: skip
            ray.init(address=self._cluster.address, log_to_driver=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        import ray

        try:
            if ray.is_initialized():
                ray.shutdown()
            if self._cluster is not None:
                self._cluster.shutdown()
        finally:
            self._cluster = None
            self.nodes = []
            if self._loopback is not None:
                self._loopback.__exit__(None, None, None)
                self._loopback = None

    # -------------------------------------------------------------- nodes
    def add(self, type_name: str, cpus: float | None = None) -> SimNode:
        """Start one node of ``type_name`` and wait until it has joined. ``cpus`` overrides its
        CPUs (0 keeps CPU work, such as Train workers, off it in a drill)."""
        if type_name not in self.spec.types or type_name == self.spec.head:
            workers = sorted(set(self.spec.types) - {self.spec.head})
            raise NeurorayError(f"no worker node type {type_name!r} in {self.spec.path}: {workers}")
        resources = host_resources(self.spec.types[type_name], self.cpus_per_node)
        if cpus is not None:
            resources["CPU"] = float(cpus)
        handle = self._cluster.add_node(
            node_ip_address="127.0.0.1", **_node_args(resources, self.object_store_mb)
        )
        self._cluster.wait_for_nodes()
        node = SimNode(type_name, handle.node_id, handle)
        self.nodes.append(node)
        return node

    def remove(self, node: SimNode, graceful: bool = True) -> None:
        """Kill a worker node and every process on it (its raylet, object store, workers)."""
        if node.handle is self._cluster.head_node:
            raise NeurorayError("the head runs the driver: remove a worker node")
        self._cluster.remove_node(node.handle, allow_graceful=graceful)
        self.nodes.remove(node)

    def of_type(self, type_name: str) -> list[SimNode]:
        return [n for n in self.nodes if n.type == type_name]

    def type_of(self, node_id: str) -> str:
        """The node type of a live node, by Ray node id."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node.type
        raise KeyError(node_id)

    def __iter__(self) -> Iterator[SimNode]:
        return iter(list(self.nodes))


def node_of_actor(actor: Any) -> str:
    """The Ray node id an actor runs on (asked of the actor itself)."""
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


# ---------------------------------------------------------------------- autoscaling
_PORT_FLAGS = (
    "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
    "ray-client-server-port", "runtime-env-agent-port", "metrics-export-port",
    "node-manager-port", "object-manager-port",
)  # fmt: skip
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD_TYPE = "ray.head.default"  # the name the fake provider gives its head


def autoscaler_config(
    spec: ClusterSpec,
    *,
    gcs_address: str,
    cpus_per_node: float = 1,
    object_store_mb: int = 80,
    idle_timeout_minutes: float | None = None,
) -> dict[str, Any]:
    """A cluster file's node types as a config for Ray's autoscaler over its fake provider.

    Node type names, custom resources, ``min_workers`` / ``max_workers``, the cluster's
    ``max_workers`` and ``upscaling_speed`` come from the file; CPUs are scaled to the host.
    The provider is loaded as an ``external`` module: Ray 2.60's wheel lacks the defaults file
    its ``fake_multinode`` type reads, and external providers need none.
    """
    types: dict[str, Any] = {}
    for name, node_type in spec.types.items():
        resources = host_resources(node_type, cpus_per_node)
        if name == spec.head:
            types[FAKE_HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
            continue
        types[name] = {
            "resources": {**resources, "object_store_memory": object_store_mb * 2**20},
            "node_config": {},
            "min_workers": node_type.min_workers,
            "max_workers": node_type.max_workers,
        }
    idle = spec.idle_timeout_minutes if idle_timeout_minutes is None else idle_timeout_minutes
    return {
        "cluster_name": "neuroray-sim",
        "max_workers": spec.max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle,
        "provider": {
            "type": "external",
            "module": FAKE_PROVIDER,
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class AutoscalingLocalCluster:
    """A head on this host whose real Ray autoscaler adds and removes nodes of a cluster file's
    types (Ray's fake multi-node provider starts them as raylets here)::

        with AutoscalingLocalCluster("cluster/aws.yaml", idle_timeout_minutes=0.1) as cluster:
            ...                       # ask for resources; cluster.active_nodes() shows what came

    Unlike ``ray.cluster_utils.AutoscalingCluster`` it never runs ``ray stop`` (which ends every
    Ray of the machine): its head is ``ray start --block`` in its own session, on its own ports
    and temp dir, stopped with SIGTERM; what is left of its nodes is found by that temp dir.
    """

    def __init__(
        self,
        cluster_file: str | Path,
        *,
        idle_timeout_minutes: float | None = None,
        cpus_per_node: float = 1,
        object_store_mb: int = 80,
        log: str | Path | None = None,
    ) -> None:
        self.spec = read_cluster_file(cluster_file)
        self.idle_timeout_minutes = idle_timeout_minutes
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.log = Path(log) if log else None
        self.address = ""
        self._head: Any = None
        self._temp_dir = ""

    def __enter__(self) -> AutoscalingLocalCluster:
        import json
        import subprocess
        import sys
        import tempfile

        import ray

        if ray.is_initialized():
            raise NeurorayError("AutoscalingLocalCluster needs a process without Ray")
        _token_auth_like_the_head()
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        self.address = f"127.0.0.1:{ports['port']}"
        self._temp_dir = tempfile.mkdtemp(prefix="nr-as-", dir="/tmp")  # socket paths are short
        config = autoscaler_config(
            self.spec,
            gcs_address=self.address,
            cpus_per_node=self.cpus_per_node,
            object_store_mb=self.object_store_mb,
            idle_timeout_minutes=self.idle_timeout_minutes,
        )
        config_path = Path(self._temp_dir) / "autoscaler.yaml"
        config_path.write_text(json.dumps(config))
        head = host_resources(self.spec.types[self.spec.head], self.cpus_per_node)
        custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU", "memory")}
        env = {
            **os.environ,
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node on 127.0.0.1
        }
        env.pop("RAY_ADDRESS", None)
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            f"--autoscaling-config={config_path}", f"--num-cpus={int(head.get('CPU', 0))}",
            f"--num-gpus={int(head.get('GPU', 0))}", f"--resources={json.dumps(custom)}",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", f"--temp-dir={self._temp_dir}", "--disable-usage-stats",
            *(f"--{flag}={port}" for flag, port in ports.items()),
        ]  # fmt: skip
        out = self.log.open("w") if self.log else subprocess.DEVNULL
        self._head = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._connect(timeout_s=120)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _connect(self, timeout_s: float) -> None:
        import socket
        import time

        import ray

        from neuroray.runtime import _loopback_node

        deadline = time.monotonic() + timeout_s
        host, port = self.address.rsplit(":", 1)
        while True:  # ray.init once the GCS listens (a refused connection only logs and retries)
            if self._head.poll() is not None:
                raise NeurorayError(f"ray start --head exited with {self._head.returncode}")
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise NeurorayError(f"the head's GCS did not listen in {timeout_s} s") from None
                time.sleep(0.5)
        with _loopback_node():
            ray.init(address=self.address, log_to_driver=False)

    def __exit__(self, *exc_info: object) -> None:
        import shutil
        import signal
        import subprocess

        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self._head is not None:
            self._head.terminate()  # `ray start --block` stops its node on SIGTERM
            try:
                self._head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self._head.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._head.wait(timeout=30)
            self._head = None
        if self._temp_dir:
            _kill_processes_mentioning(self._temp_dir)  # nodes the autoscaler left running
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    def autoscaler_report(self) -> dict[str, Any]:
        """The autoscaler's own last summary (``ray status`` reads the same): ``active_nodes``,
        ``idle_nodes``, ``pending_launches`` per node type, ``failed_nodes``."""
        import json

        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return json.loads(raw).get("autoscaler_report", {}) if raw else {}

    def active_nodes(self) -> dict[str, int]:
        """Worker nodes up, per node type, as the autoscaler counts them."""
        active = self.autoscaler_report().get("active_nodes") or {}
        return {k: v for k, v in active.items() if k != FAKE_HEAD_TYPE and v}


def _token_auth_like_the_head() -> None:
    """Make this process send Ray's auth token, as the head it starts will require.

    ``ray start`` turns token auth on when ``RAY_AUTH_MODE`` is unset (2.60's default), but
    ``ray.init(address=...)`` sends the token only when this process's Ray config says token
    mode, and Ray reads that config at import: a process that starts its own cluster gets it
    switched on by Ray (LocalCluster), a process joining one does not. So, as Ray does for its
    own clusters: set the mode (kept if the user set one) and reload the config."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return  # the user's choice reaches both the head and this process
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _kill_processes_mentioning(marker: str) -> list[int]:
    """SIGKILL this user's processes whose command line names ``marker`` (a temp dir only this
    cluster used), one by one by pid; returns their pids."""
    import psutil

    killed = []
    for process in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            if process.info["uids"] and process.info["uids"].real != os.getuid():
                continue
            if any(marker in part for part in process.info["cmdline"] or ()):
                process.kill()
                killed.append(process.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return killed
