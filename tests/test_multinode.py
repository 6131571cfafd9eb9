"""neuroray on several real Ray nodes: placement by the cluster files' resources, and node loss.

Each test runs one scenario of ``tests/multinode_scenarios.py`` in a fresh Python process: a
:class:`neuroray.simcluster.LocalCluster` of real raylets on this host (a head plus chunk-server
and GPU-trainer nodes, typed by ``cluster/aws.yaml``) needs its own Ray session, and this
process keeps the shared ``ray_session`` one untouched for the tests after these. The scenario
stops its nodes in a ``finally``; if it hangs, it is interrupted (so its ``finally`` runs) and
then killed, and Ray's reaper takes the nodes of a killed process down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neuroray.simcluster import DETECTED, host_resources, read_cluster_file

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "tests" / "multinode_scenarios.py"
AWS = REPO / "cluster" / "aws.yaml"


def run_scenario(name: str, work: Path, timeout_s: float = 240) -> dict:
    """Run a scenario in its own process; its observations, or a failure with its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)  # its own cluster, never the session's Ray
    proc = subprocess.Popen(
        [sys.executable, str(SCENARIOS), name, str(work)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt: its finally stops the nodes
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"scenario {name} ran over {timeout_s} s:\n{output[-6000:]}")
    result = work / "result.json"
    assert proc.returncode == 0 and result.exists(), f"scenario {name} failed:\n{output[-6000:]}"
    return json.loads(result.read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_node_types_come_from_the_cluster_file(name):
    """The simulated nodes are the file's types: its declared resources and limits, and for AWS
    the CPU / GPU Ray detects from the instance type; placement is found by resource name."""
    path = REPO / "cluster" / name
    raw = yaml.safe_load(path.read_text())
    spec = read_cluster_file(path)
    assert spec.head == raw["head_node_type"] and set(spec.types) == set(
        raw["available_node_types"]
    )
    for type_name, node in raw["available_node_types"].items():
        simulated = spec.types[type_name]
        declared = node.get("resources") or {}
        assert {k: simulated.resources[k] for k in declared} == declared, type_name
        detected = DETECTED.get(simulated.instance_type, {})
        assert simulated.resources == {**detected, **declared}, type_name
        assert (simulated.min_workers, simulated.max_workers) == (
            node.get("min_workers", 0), node.get("max_workers", 0))  # fmt: skip
    chunk = [t.name for t in spec.with_resource("chunk_server")]
    assert chunk == [
        n for n, t in raw["available_node_types"].items()
        if (t.get("resources") or {}).get("chunk_server") and t["max_workers"] > 0
    ]  # fmt: skip
    gpu = spec.with_resource("GPU")
    assert gpu and all(t.resources["GPU"] >= 1 and t.max_workers > 0 for t in gpu)
    assert spec.types[spec.head].resources["CPU"] == 0  # the head runs drivers only


def test_host_resources_cap_cpus_and_keep_the_rest():
    spec = read_cluster_file(AWS)
    for node in spec.types.values():
        on_host = host_resources(node, cpus_per_node=1)
        assert on_host["CPU"] == min(node.resources.get("CPU", 1), 1)
        assert {k: v for k, v in on_host.items() if k != "CPU"} == {
            k: v for k, v in node.resources.items() if k != "CPU"
        }


@pytest.mark.slow
def test_servers_on_chunk_nodes_and_train_workers_on_gpu_nodes(tmp_path):
    seen = run_scenario("placement", tmp_path)
    assert seen["server_types"] == [seen["chunk_type"]] * 6
    assert seen["server_nodes"] == 2  # both chunk-server nodes serve
    assert seen["worker_types"] == [seen["gpu_type"]]
    assert seen["worker_gpus"] == [[0]] or seen["worker_gpus"] == [["0"]]
    assert seen["worker_crops"] == 12 and seen["worker_wrong"] == 0  # read across nodes
    assert seen["driver_wrong"] == 0


@pytest.mark.slow
def test_chunk_server_node_lost_mid_stream_loses_and_duplicates_nothing(tmp_path):
    seen = run_scenario("chunk_node_loss", tmp_path)
    for mode, run in seen["runs"].items():
        assert run["servers_on_victim"] >= 1, mode  # the removed node did serve
        assert run["served"] == run["batches"] == 40, mode  # none lost, none extra
        assert run["crops"] == 160, mode
        assert run["wrong"] == 0, mode  # image and labels equal a direct read, in order
        assert run["retries"] >= 1, mode  # the loss was seen and recovered from
        assert run["servers_on_victim_after"] == 0, mode  # restarted on the surviving node
        assert set(run["alive_types_after"]) == {seen["chunk_type"]}, mode


@pytest.mark.slow
def test_blockwise_node_lost_fails_loudly_and_rerun_completes_only_missing_blocks(tmp_path):
    seen = run_scenario("blockwise_node_loss", tmp_path)
    blocks = seen["blocks"]
    assert blocks == 32
    error = seen["error"]
    assert error is not None and "failed in stage 'agglomerate'" in error, error
    assert "rerun the same command" in error
    lost = int(error.split(" of ")[0])
    assert lost >= 1 and seen["marked_after_failure"] == blocks - lost
    stages = {stage: (done, skipped) for stage, done, skipped in seen["rerun_stages"]}
    assert stages["agglomerate"] == (lost, blocks - lost)  # only the missing blocks
    assert seen["equal_layers"] == {"blocks": True, "segmentation": True}  # bit for bit


@pytest.mark.slow
def test_autoscaler_adds_the_cluster_files_node_types_and_removes_idle_ones(tmp_path):
    """Ray's autoscaler (its fake multi-node provider starts raylets here) with aws.yaml's node
    types, resources and limits, and a 6 s idle timeout."""
    seen = run_scenario("autoscaling", tmp_path, timeout_s=360)
    assert seen["chunk_servers_at_start"] == 0 and seen["nodes_at_start"] == 1  # the head only
    # per_node + 2 servers need two chunk-server nodes; the GPU task one GPU node
    assert seen["active_when_busy"] == {seen["chunk_type"]: 2, seen["gpu_type"]: 1}
    assert seen["chunk_servers_when_busy"] == 2 * seen["per_node"]
    assert seen["gpu_node_resources"]["GPU"] == 1
    assert seen["wrong"] == 0
    assert seen["down_s"] is not None, "idle nodes were not removed within 120 s"
    assert seen["active_when_idle"] == {} and seen["nodes_when_idle"] == 1
    assert seen["failed_nodes"] == []


@pytest.mark.slow
def test_trainer_node_lost_resumes_from_its_checkpoint_to_the_undisturbed_weights(tmp_path):
    seen = run_scenario("trainer_node_loss", tmp_path, timeout_s=360)
    assert seen["removed"], "the run finished before its first checkpoint appeared"
    assert seen["error"] is None, seen["error"]
    assert seen["clean_starts"] == [0]
    starts = seen["starts"]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] > 0 and starts[1] % 3 == 0, starts
    assert seen["final_step"] == seen["lost_step"] == seen["clean_step"] == 12
    assert seen["weights_differ"] == []  # bit for bit the undisturbed run's weights


@pytest.mark.slow
def test_tune_sweep_survives_losing_the_node_of_one_trial(tmp_path):
    """Two trials on two trainer nodes; one trial's node is removed after its first checkpoint
    and a replacement joins. Its twin (same job and seed, differing only in run.max_failures)
    is the undisturbed reference: equal final step, validation metric and weights."""
    seen = run_scenario("tune_node_loss", tmp_path, timeout_s=480)
    assert seen["removed"] and seen["removed_type"] == "gpu_train", seen
    assert seen["error"] is None, seen["error"]
    trials = seen["trials"]
    assert len(trials) == 2, trials
    assert all(t["status"] == "TERMINATED" and t["last_step"] == 8 for t in trials.values())
    hit = [t for t in trials.values() if len(t["starts"]) > 1]
    assert len(hit) == 1, trials  # the trial on the lost node restarted, once
    (hit,) = hit
    (twin,) = (t for t in trials.values() if t is not hit)
    assert hit["starts"][0] == 0 and hit["starts"][-1] in (4, 8), hit  # from its checkpoint
    assert twin["starts"] == [0], twin
    assert hit["value"] is not None and hit["value"] == twin["value"]
    assert seen["weights_differ"] == []  # bit for bit the undisturbed trial's weights
