"""Cluster files: they parse, pass Ray's own checks, name real images and machine types, and every
`neuroray ...` command in them is one the CLI accepts."""

from __future__ import annotations

import json
import re
import shlex
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml

from neuroray.cli import build_parser
from neuroray.trainers.data import DataSettings

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_FILES = ("aws.yaml", "gcp.yaml")
KUBERAY_FILES = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")

# The images and machine types the cluster files may name (each is justified in cluster/README.md).
PUBLIC_IMAGES = {"rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.60.0-py311"}
PROJECT_IMAGE = "neuroray:ray2.60.0-py311-gpu"  # built from cluster/Dockerfile
AWS_INSTANCE_TYPES = {"m6i.2xlarge", "r6i.2xlarge", "g5.2xlarge"}
AWS_IMAGE_IDS = {
    "resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
    "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
}
GCP_MACHINE_TYPES = {"n2-standard-8", "n2-highmem-8", "n1-standard-8"}
GCP_ACCELERATORS = {"nvidia-tesla-t4"}
GCP_SOURCE_IMAGES = {
    "projects/deeplearning-platform-release/global/images/family/"
    "common-cu128-ubuntu-2204-nvidia-570"
}


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _strings(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _values(node, key: str) -> Iterator:
    """Every value stored under ``key`` anywhere in a YAML tree."""
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from _values(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _values(value, key)


# ---------------------------------------------------------------------- commands vs the CLI
# `neuroray` where a command starts: a line's start, or after `--`, `&&`, `||`, `;`, `|`, `$(`, "`"
_COMMAND = re.compile(r"(?:^\s*|(?:--|&&|\|\||;|\||\$\(|`)\s*)\bneuroray\s+(?=[a-z-])")


def _code_text(path: Path) -> list[str]:
    """The parts of a file that are commands: YAML string values, Dockerfile instructions,
    fenced code blocks of Markdown."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        return list(_strings(yaml.safe_load(text)))
    if path.suffix == ".md":
        return re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    return ["\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))]


def neuroray_commands(path: Path) -> list[list[str]]:
    """Each `neuroray ...` command line in a file, split like a shell would."""
    commands = []
    for chunk in _code_text(path):
        chunk = chunk.replace("\\\n", " ")
        for line in chunk.splitlines():
            for match in _COMMAND.finditer(line):
                start = match.group().index("neuroray") + match.start()
                rest = re.split(r"\s(?:&&|\|\||;|\|)\s|>\s*/dev/null", line[start:])[0]
                commands.append(shlex.split(rest))
    return commands


def _all_commands() -> list[tuple[str, list[str]]]:
    return [
        (f"{path.name}: {' '.join(command[:4])}", command)
        for path in sorted(CLUSTER.iterdir())
        for command in neuroray_commands(path)
    ]


def test_every_cluster_file_has_commands_or_is_data():
    named = {label.split(":")[0] for label, _ in _all_commands()}
    assert {"README.md", "kuberay-rayjob.yaml", "Dockerfile"} <= named


def _config_model(args):
    """The config model a parsed job command loads (None for commands without one)."""
    import importlib

    from neuroray import cli

    if args.func is cli.cmd_pretrain:
        return cli.pretrain_methods().get(args.method).job_class
    if getattr(args, "job_module", None):
        return importlib.import_module(args.job_module).JOB_CLASS
    if args.func is cli.cmd_tune:
        from neuroray.tuning.sweeps import SweepJob

        return SweepJob
    if args.func is cli.cmd_segment:
        from neuroray.segmentation.blockwise import SegmentJob

        return SegmentJob
    return None


CLUSTER_FS = "/mnt/shared/"  # the cluster's shared file system in the README's commands


def _load_cluster_job(model, args):
    """``_load_job`` as the CLI runs it, except that inputs on the cluster's shared file system
    (which do not exist on this machine) are not required to exist here; every other input is."""
    from neuroray.cli import _load_job
    from neuroray.config import load_config
    from neuroray.errors import ConfigError

    try:
        return _load_job(model, args)
    except ConfigError as error:
        message = str(error)
        if not message.startswith("input not found: "):
            raise
        missing = message.removeprefix("input not found: ").split(" (relative")[0].split(", ")
        if not all(f"={CLUSTER_FS}" in m or f":{CLUSTER_FS}" in m for m in missing):
            raise
    paths = [a for a in args.args if "=" not in a]
    overrides = [*getattr(args, "fixed_overrides", []), *(a for a in args.args if "=" in a)]
    return load_config(model, paths[0] if paths else None, overrides)


@pytest.mark.parametrize("label,command", _all_commands(), ids=[c[0] for c in _all_commands()])
def test_command_matches_the_cli(label, command):
    """The command parses, and its config + overrides load (the image's /home/ray/neuroray is the
    repository root)."""
    try:
        args = build_parser().parse_args(command[1:])
    except SystemExit as exit_:
        assert exit_.code == 0, f"{label}: `{shlex.join(command)}` is not a neuroray command"
        return  # --help
    model = _config_model(args)
    if model is None:
        return
    args.args = [a.replace("/home/ray/neuroray/", f"{REPO}/") for a in args.args]
    args.args = [a if "=" in a or Path(a).is_absolute() else str(REPO / a) for a in args.args]
    config = _load_cluster_job(model, args)  # unknown keys or wrong types raise ConfigError
    if model.__name__ == "SweepJob":
        from neuroray.tuning.sweeps import prepare_sweep

        if not Path(config.job).is_absolute():
            config = config.model_copy(update={"job": str(REPO / config.job)})
        prepare_sweep(config)  # the job and its overrides load too


# ---------------------------------------------------------------------- launcher configs
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_rays_schema(name):
    from ray.autoscaler._private.util import validate_config

    config = _load(name)
    validate_config(config)  # raises on anything Ray's schema rejects
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # drivers only
    assert config["idle_timeout_minutes"] > 0 and config["max_workers"] >= 1
    chunk = [t for t in types.values() if t.get("resources", {}).get("chunk_server")]
    assert chunk and all(t["max_workers"] > t["min_workers"] == 0 for t in chunk)
    for node_type in types.values():
        assert (
            node_type.get("min_workers", 0) <= node_type.get("max_workers", 0) or node_type is head
        )
    spot = [
        t for t in types.values()
        if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        or any(s.get("preemptible") for s in t["node_config"].get("scheduling", []))
    ]  # fmt: skip
    assert spot, "spot / preemptible workers must be available as an option"
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in starts
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_aws_names_real_instance_types_and_images():
    config = _load("aws.yaml")
    node_configs = [t["node_config"] for t in config["available_node_types"].values()]
    assert {n["InstanceType"] for n in node_configs} <= AWS_INSTANCE_TYPES
    assert {n["ImageId"] for n in node_configs} <= AWS_IMAGE_IDS
    assert set(_values(config, "image")) | set(_values(config, "worker_image")) <= PUBLIC_IMAGES


def test_gcp_names_real_machine_types_and_images():
    config = _load("gcp.yaml")
    node_configs = [t["node_config"] for t in config["available_node_types"].values()]
    assert {n["machineType"] for n in node_configs} <= GCP_MACHINE_TYPES
    assert set(_values(config, "acceleratorType")) <= GCP_ACCELERATORS
    assert set(_values(config, "sourceImage")) <= GCP_SOURCE_IMAGES
    assert set(_values(config, "image")) | set(_values(config, "worker_image")) <= PUBLIC_IMAGES
    for node_type in config["available_node_types"].values():  # GCP does not detect resources
        assert "CPU" in node_type["resources"]
        if "guestAccelerators" in node_type["node_config"]:
            assert node_type["resources"]["GPU"] == 1
            assert {"onHostMaintenance": "TERMINATE"} in node_type["node_config"]["scheduling"]


def test_chunk_server_resource_is_what_data_settings_target():
    settings = DataSettings(image="gs://bucket/raw", server_resources={"chunk_server": 1})
    for name in LAUNCHER_FILES:
        types = _load(name)["available_node_types"].values()
        assert any(set(settings.server_resources) <= set(t.get("resources", {})) for t in types)
    for name in KUBERAY_FILES:  # KubeRay passes rayStartParams.resources as a quoted JSON string
        params = [p.get("resources") for p in _values(_load(name), "rayStartParams")]
        declared = [json.loads(json.loads(p)) for p in params if p]
        assert {"chunk_server": 4} in declared, name


# ---------------------------------------------------------------------- KubeRay and the image
def test_kuberay_cluster_autoscales_with_cpu_and_gpu_groups():
    cluster = _load("kuberay-raycluster.yaml")
    job = _load("kuberay-rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["rayVersion"] == ray.__version__
        assert spec["authOptions"] == {"mode": "token"}
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        gpu = groups["gpu-trainers"]["template"]["spec"]["containers"][0]["resources"]
        assert gpu["limits"]["nvidia.com/gpu"] == "1"
        assert all(g["minReplicas"] <= g["maxReplicas"] for g in groups.values())
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["entrypoint"].startswith("neuroray ")
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    images = set(_values(cluster, "image")) | set(_values(job, "image"))
    assert images == {PROJECT_IMAGE}


def _dashboard_hosts(name: str) -> list[str]:
    """Every dashboard host a cluster file sets (launcher flags or KubeRay rayStartParams)."""
    config = _load(name)
    if name in LAUNCHER_FILES:
        starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
        return re.findall(r"--dashboard-host[= ](\S+)", starts)
    return [p["dashboard-host"] for p in _values(config, "rayStartParams") if "dashboard-host" in p]


@pytest.mark.parametrize("name", LAUNCHER_FILES + ("kuberay-raycluster.yaml",))
def test_the_dashboard_stays_on_loopback(name):
    """The dashboard runs submitted code: heads keep it on 127.0.0.1, reached by a forward."""
    assert _dashboard_hosts(name) == ["127.0.0.1"]
    text = (CLUSTER / name).read_text()
    assert "0.0.0.0" not in text
    readme = (CLUSTER / "README.md").read_text()
    forward = f"ray dashboard cluster/{name}" if name in LAUNCHER_FILES else "kubectl port-forward"
    assert forward in readme and "ssh -L 8265:127.0.0.1:8265" in readme


def test_the_rayjob_dashboard_is_the_documented_exception_and_needs_the_token():
    """K8sJobMode's submitter pod and the operator reach the dashboard over the pod network."""
    job = _load("kuberay-rayjob.yaml")
    assert _dashboard_hosts("kuberay-rayjob.yaml") == ["0.0.0.0"]
    assert job["spec"]["submissionMode"] == "K8sJobMode"
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    readme = (CLUSTER / "README.md").read_text()
    assert "**The exception: `kuberay-rayjob.yaml`**" in readme


def test_dockerfile_builds_on_the_matching_ray_image():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, flags=re.M)[1]
    assert base in PUBLIC_IMAGES and base.endswith("-gpu")
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{ray.__version__}-{version}-gpu"  # what the tests run on
    build = f"docker build -f cluster/Dockerfile -t {PROJECT_IMAGE} ."
    assert build in dockerfile and build in (CLUSTER / "README.md").read_text()


def test_every_named_image_and_type_is_justified_in_the_readme():
    readme = (CLUSTER / "README.md").read_text()
    names = (
        PUBLIC_IMAGES | {PROJECT_IMAGE} | AWS_INSTANCE_TYPES | AWS_IMAGE_IDS | GCP_MACHINE_TYPES
        | GCP_ACCELERATORS | GCP_SOURCE_IMAGES
    )  # fmt: skip
    assert [name for name in names if name not in readme] == []


# ---------------------------------------------------------------------- what a job uploads
def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    spec = _load("runtime_env.yaml")
    env = RuntimeEnv(**spec)
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert "working_dir" not in spec  # `ray job submit --working-dir .` ships the code


def _upload(directory: Path, target: Path) -> set[str]:
    """The files `ray job submit --working-dir DIR --runtime-env cluster/runtime_env.yaml` sends."""
    from ray._private.runtime_env.packaging import create_package

    excludes = _load("runtime_env.yaml")["excludes"]
    create_package(str(directory), target, include_gitignore=True, excludes=excludes)
    return set(zipfile.ZipFile(target).namelist())


def test_rayignore_leaves_out_environments_runs_and_data(tmp_path):
    tree = tmp_path / "checkout"
    tree.mkdir()
    for name in (".rayignore", ".gitignore"):
        (tree / name).write_text((REPO / name).read_text())
    left_out = (".venv/bin/python", "runs/mae/model.pt", "demo_out/seg/info", "data/em/a.h5",
                "layers/raw/info")  # fmt: skip
    kept = ("neuroray/cli.py", "neuroray/data/keep.py", "configs/finetune_em.yaml")
    for path in left_out + kept:
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text("x")
    files = {name for name in _upload(tree, tmp_path / "probe.zip") if not name.endswith("/")}
    assert files == {".rayignore", ".gitignore", *kept}


CREDENTIALS = (".env", ".env.production", "deploy/server.pem", "ssl/tls.key", "keys/id_rsa",
               "keys/id_ed25519.pub", ".ssh/config", ".aws/credentials", ".aws/config",
               ".config/gcloud/application_default_credentials.json", ".kube/config",
               ".ray/auth_token", "auth_token", ".netrc", ".pypirc", ".git-credentials",
               "gcp-credentials.json", "service-account-prod.json", "store/user.p12",
               "infra/terraform.tfstate", ".docker/config.json")  # fmt: skip


def test_rayignore_leaves_out_credentials(tmp_path):
    """Keys, tokens and cloud credential files anywhere in the checkout stay on this machine."""
    tree = tmp_path / "checkout"
    tree.mkdir()
    for name in (".rayignore", ".gitignore"):
        (tree / name).write_text((REPO / name).read_text())
    kept = ("neuroray/cli.py", "configs/finetune_em.yaml", "cluster/aws.yaml", "docs/keys.md",
            "neuroray/env.py", "neuroray/agents/env.py")  # fmt: skip
    for path in (*CREDENTIALS, *(f"sub/dir/{c}" for c in CREDENTIALS), *kept):
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text("secret")
    files = {name for name in _upload(tree, tmp_path / "probe.zip") if not name.endswith("/")}
    assert files == {".rayignore", ".gitignore", *kept}


def test_the_repository_upload_is_small(tmp_path):
    names = _upload(REPO, tmp_path / "upload.zip")
    tops = {name.split("/")[0] for name in names}
    assert not tops & {".venv", ".git", "runs", "demo_out", "data", "layers"}
    assert {"neuroray", "configs", "cluster", "pyproject.toml"} <= tops
    assert (tmp_path / "upload.zip").stat().st_size < 10 * 2**20
