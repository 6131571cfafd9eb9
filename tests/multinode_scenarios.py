"""Multi-node scenarios for tests/test_multinode.py, each run in a fresh Python process.

``python tests/multinode_scenarios.py NAME WORKDIR`` starts a :class:`LocalCluster` (real raylets
on this host, typed by cluster/aws.yaml), runs scenario NAME, writes what it observed to
``WORKDIR/result.json`` and stops every node it started, however it ends. The assertions are
in the test module; this file only observes. A separate process is needed because a cluster
needs its own Ray session and the pytest process holds the shared ``ray_session`` one.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILE = REPO / "cluster" / "aws.yaml"
CHUNK = "chunk_server"  # the resource DataSettings.server_resources names (test_cluster checks
#                         that the cluster files declare it); node types are found by it
GPU = "GPU"


# ---------------------------------------------------------------------- inputs
def em_layers(work: Path, shape=(32, 96, 128), chunks=(16, 32, 64)) -> dict[str, str]:
    """Synthetic EM image + labels as precomputed layers (several chunks per axis)."""
    from neuroray.platform.synthetic import synth_em
    from neuroray.platform.volume import create_volume

    em = synth_em(shape=shape, seed=3, voxel_size=(10.0, 10.0, 10.0))
    layers = {}
    for name, array, kind in (("image", em.raw, "image"), ("labels", em.labels, "segmentation")):
        url = str(work / name)
        layer = create_volume(url, shape=shape, dtype=array.dtype, chunk_shape=chunks,
                              layer_type=kind, format="precomputed")  # fmt: skip
        layer.write(layer.bounds, array)
        layers[name] = url
    return layers


def affinity_layer(work: Path, shape=(32, 128, 128)) -> str:
    """Noisy affinities of synthetic touching neurons, uint8, for agglomeration-only segment."""
    from written_layers import write_affinity_layer  # tests/, this script's folder

    from neuroray.platform.synthetic import synth_em

    labels = synth_em(shape=shape, seed=4, voxel_size=(10.0, 10.0, 10.0)).labels
    return write_affinity_layer(
        str(work / "affinities"), labels, noise=0.15, seed=0, chunk_shape=(16, 32, 32)
    )


def node_types():
    from neuroray.simcluster import read_cluster_file

    spec = read_cluster_file(CLUSTER_FILE)
    return spec, spec.with_resource(CHUNK)[0].name, spec.with_resource(GPU)[0].name


def crop_batches(pool, count: int, per_batch: int = 4, seed: int = 11):
    from neuroray.platform.sampler import CropSampler

    sampler = CropSampler(pool.bounds, (8, 32, 32), seed=seed)
    boxes = sampler.boxes(0, 0)
    return [[next(boxes) for _ in range(per_batch)] for _ in range(count)]


def compare(batch_boxes, served: dict, arrays: dict) -> int:
    """How many crops of a batch differ from a direct read of the layers (image and labels)."""
    wrong = 0
    for i, box in enumerate(batch_boxes):
        for name, array in arrays.items():
            if not np.array_equal(served[name][i], array[box.slices]):
                wrong += 1
                break
    return wrong


def registered_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train's controller has registered a checkpoint of the run (its checkpoint
    manager's snapshot lists one): only then does a restart resume from it. A checkpoint folder
    in storage alone is not enough: the controller collects it at its next poll."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(snapshot.get("checkpoint_results"))


# ---------------------------------------------------------------------- scenarios
def placement(work: Path) -> dict:
    """Chunk servers land on chunk-server nodes, Train workers on GPU nodes, and a worker on the
    trainer node reads correct crops from servers on other nodes."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from neuroray.platform.server import ServerPool
    from neuroray.platform.volume import open_volume
    from neuroray.simcluster import LocalCluster, node_of_actor
    from neuroray.trainers.data import DataSettings

    spec, chunk_type, gpu_type = node_types()
    layers = em_layers(work)
    with LocalCluster(CLUSTER_FILE, dashboard=True) as cluster:  # Train V2 needs the State API
        for _ in range(2):
            cluster.add(chunk_type)
        cluster.add(gpu_type)
        # fit's pool (start_pool) with the job's server_resources; serving blocks of one storage
        # chunk, so the tiny volume splits into 12 blocks and 6 shards (the default block would
        # make it one shard)
        data = DataSettings(image=layers["image"], labels=layers["labels"], num_servers=6,
                            cache_mb=8, server_resources={CHUNK: 1})  # fmt: skip
        pool = ServerPool(data.layers(), num_servers=data.num_servers, cache_mb=data.cache_mb,
                          num_cpus=data.server_cpus, resources=data.server_resources,
                          block_shape=(16, 32, 64))  # fmt: skip
        with pool:
            servers = [cluster.type_of(node_of_actor(s)) for s in pool.servers]
            server_nodes = sorted({node_of_actor(s) for s in pool.servers})

            def worker(config: dict) -> None:
                import ray
                import ray.train

                from neuroray.platform.volume import open_volume

                pool = config["pool"]
                batch = crop_batches(pool, 3)
                arrays = {n: open_volume(u)[:] for n, u in pool.layers.items()}
                wrong = sum(compare(b, pool.get_crops(b), arrays) for b in batch)
                rank = ray.train.get_context().get_world_rank()
                out = {"node": ray.get_runtime_context().get_node_id(), "gpus": ray.get_gpu_ids(),
                       "wrong": wrong, "crops": 12}  # fmt: skip
                Path(config["out"], f"worker{rank}.json").write_text(json.dumps(out))
                ray.train.report({"wrong": wrong})

            # what neuroray's fit asks for with run.use_gpu=true: one GPU per worker
            trainer = DataParallelTrainer(
                worker,
                train_loop_config={"pool": pool, "out": str(work)},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=True,
                                             resources_per_worker={"CPU": 1, "GPU": 1}),
                run_config=RunConfig(name="placement", storage_path=str(work / "runs")),
            )  # fmt: skip
            trainer.fit()
            arrays = {n: open_volume(u)[:] for n, u in layers.items()}
            batch = crop_batches(pool, 2, seed=5)
            driver_wrong = sum(compare(b, pool.get_crops(b), arrays) for b in batch)
        workers = [json.loads(p.read_text()) for p in sorted(work.glob("worker*.json"))]
        return {
            "chunk_type": chunk_type,
            "gpu_type": gpu_type,
            "server_types": servers,
            "server_nodes": len(server_nodes),
            "worker_types": [cluster.type_of(w["node"]) for w in workers],
            "worker_gpus": [w["gpus"] for w in workers],
            "worker_wrong": sum(w["wrong"] for w in workers),
            "worker_crops": sum(w["crops"] for w in workers),
            "driver_wrong": driver_wrong,
            "head_type": spec.head,
        }


def chunk_node_loss(work: Path) -> dict:
    """A chunk-server node dies mid-iteration, in each serving mode: the consumer's stream goes
    on, every crop as a direct read gives it, none lost, duplicated or reordered."""
    from neuroray.platform.server import ServerPool
    from neuroray.platform.volume import open_volume
    from neuroray.simcluster import LocalCluster, node_of_actor

    _, chunk_type, _ = node_types()
    layers = em_layers(work)
    arrays = {n: open_volume(u)[:] for n, u in layers.items()}
    runs = {}
    with LocalCluster(CLUSTER_FILE) as cluster:
        for _ in range(2):
            cluster.add(chunk_type)
        for mode in ("chunks", "crops"):
            pool = ServerPool(layers, num_servers=4, cache_mb=4, client_cache_mb=1, mode=mode,
                              block_shape=(16, 32, 64), resources={CHUNK: 1})  # fmt: skip
            try:
                where = [node_of_actor(s) for s in pool.servers]
                victim_id = collections.Counter(where).most_common(1)[0][0]
                victim = next(n for n in cluster.nodes if n.node_id == victim_id)
                batches = crop_batches(pool, 40)
                served, wrong, removed_at, recovered_s = 0, 0, None, None
                for i, out in enumerate(pool.stream(batches, max_in_flight=3)):
                    if i == 8:
                        removed_at = time.monotonic()
                        cluster.remove(victim)
                    if i == 9:
                        recovered_s = time.monotonic() - removed_at
                    wrong += compare(batches[i], out, arrays)
                    served += 1
                after = [node_of_actor(s) for s in pool.servers]
                runs[mode] = {
                    "batches": len(batches),
                    "served": served,
                    "crops": pool.stats_.crops,
                    "wrong": wrong,
                    "retries": pool.stats_.retries,
                    "servers_on_victim": where.count(victim_id),
                    "servers_on_victim_after": after.count(victim_id),
                    "alive_types_after": sorted(cluster.type_of(n) for n in after),
                    "recovered_s": recovered_s,
                }
            finally:
                pool.shutdown()
            cluster.add(chunk_type)  # a replacement joins before the next mode's run
    return {"chunk_type": chunk_type, "runs": runs}


def blockwise_node_loss(work: Path) -> dict:
    """A worker node dies while segment() runs: the job fails naming the lost blocks; after a
    node joins, the rerun does only those and every layer equals an undisturbed run's."""
    from neuroray.errors import NeurorayError
    from neuroray.platform.volume import open_volume
    from neuroray.segmentation.block_output import Markers
    from neuroray.segmentation.blockwise import SegmentJob, segment
    from neuroray.simcluster import LocalCluster

    _, chunk_type, gpu_type = node_types()
    url = affinity_layer(work)
    block = (16, 32, 32)  # 2 x 4 x 4 = 32 blocks
    with LocalCluster(CLUSTER_FILE) as cluster:
        cluster.add(chunk_type)
        doomed = cluster.add(gpu_type)
        clean = segment(SegmentJob(affinities=url, output=str(work / "clean"), block_shape=block),
                        progress=False)  # fmt: skip
        config = SegmentJob(affinities=url, output=str(work / "out"), block_shape=block)
        markers = Markers(config.output)
        outcome: dict = {}

        def run() -> None:
            try:
                segment(config, progress=False)
                outcome["error"] = None
            except NeurorayError as err:
                outcome["error"] = str(err)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and thread.is_alive():  # remove it mid-stage
            done = len(list((markers.root / "agglomerate").glob("*.json")))
            if done >= 4:
                cluster.remove(doomed)
                break
            time.sleep(0.02)
        removed_after = done
        thread.join(timeout=300)
        marked = len(list((markers.root / "agglomerate").glob("*.json")))
        cluster.add(gpu_type)  # a node joins; the rerun does what is missing
        rerun = segment(config, progress=False)
        layers = {}
        for name in ("blocks", "segmentation"):  # per-block ids, and the stitched result
            a, b = (open_volume(str(Path(r.output) / name))[:] for r in (clean, rerun))
            layers[name] = bool(a.dtype == b.dtype and np.array_equal(a, b))
    return {
        "blocks": clean.stages[0].done,
        "removed_after": removed_after,
        "error": outcome.get("error", "thread still running"),
        "marked_after_failure": marked,
        "rerun_stages": [[s.stage, s.done, s.skipped] for s in rerun.stages],
        "equal_layers": layers,
    }


def autoscaling(work: Path) -> dict:
    """Ray's autoscaler, given aws.yaml's node types: more chunk servers than the cluster holds
    and a GPU task make it add chunk-server and GPU nodes; idle, they go away."""
    import ray

    from neuroray.platform.server import ServerPool
    from neuroray.platform.volume import open_volume
    from neuroray.simcluster import AutoscalingLocalCluster

    spec, chunk_type, gpu_type = node_types()
    per_node = int(spec.types[chunk_type].resources[CHUNK])
    layers = em_layers(work)
    arrays = {n: open_volume(u)[:] for n, u in layers.items()}
    seen: dict = {"chunk_type": chunk_type, "gpu_type": gpu_type, "per_node": per_node}

    def wait_for(predicate, timeout_s: float) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if predicate():
                return round(time.monotonic() - started, 1)
            time.sleep(0.5)
        return None

    with AutoscalingLocalCluster(CLUSTER_FILE, idle_timeout_minutes=0.1,
                                 log=work / "head.log") as cluster:  # fmt: skip
        seen["chunk_servers_at_start"] = ray.cluster_resources().get(CHUNK, 0)
        seen["nodes_at_start"] = len([n for n in ray.nodes() if n["Alive"]])

        @ray.remote(num_gpus=1)
        def on_gpu() -> str:
            return ray.get_runtime_context().get_node_id()

        started = time.monotonic()
        gpu_ref = on_gpu.remote()
        pool = ServerPool(layers, num_servers=per_node + 2, cache_mb=4, block_shape=(16, 32, 64),
                          resources={CHUNK: 1})  # fmt: skip
        try:
            seen["servers_up_s"] = round(time.monotonic() - started, 1)
            gpu_node = ray.get(gpu_ref, timeout=180)
            wanted = {chunk_type: 2, gpu_type: 1}
            seen["up_report_s"] = wait_for(lambda: cluster.active_nodes() == wanted, 60)
            seen["active_when_busy"] = cluster.active_nodes()
            seen["chunk_servers_when_busy"] = ray.cluster_resources().get(CHUNK, 0)
            alive = [n for n in ray.nodes() if n["Alive"]]
            seen["gpu_node_resources"] = next(
                {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU", CHUNK)}
                for n in alive if n["NodeID"] == gpu_node
            )  # fmt: skip
            batch = crop_batches(pool, 2)
            seen["wrong"] = sum(compare(b, pool.get_crops(b), arrays) for b in batch)
        finally:
            pool.shutdown()
        seen["down_s"] = wait_for(lambda: not cluster.active_nodes(), 120)
        seen["active_when_idle"] = cluster.active_nodes()
        seen["nodes_when_idle"] = len([n for n in ray.nodes() if n["Alive"]])
        seen["failed_nodes"] = cluster.autoscaler_report().get("failed_nodes", [])
    return seen


def trainer_node_loss(work: Path) -> dict:
    """MAE pretraining whose trainer node dies after a checkpoint: a replacement node joins, Ray
    Train restarts the worker there from the last checkpoint, and the run ends at the same step
    with the same weights as an undisturbed run on the same cluster."""
    import torch

    from neuroray.config import validate
    from neuroray.models.checkpoint import load_model_checkpoint
    from neuroray.simcluster import LocalCluster
    from neuroray.trainers.loop import read_starts
    from neuroray.trainers.pretrain import MAEJob, pretrain

    _, chunk_type, gpu_type = node_types()
    image = em_layers(work, shape=(32, 128, 128))["image"]

    def job(name: str) -> MAEJob:
        return validate(MAEJob, {
            "data": {"image": image, "sampler": {"crop_shape": [16, 64, 64]}, "num_servers": 1,
                     "cache_mb": 32, "server_resources": {CHUNK: 1}},
            "model": {"encoder": {"size": None, "width": 48, "depth": 2, "heads": 2,
                                  "img_size": [16, 64, 64]},
                      "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
            "run": {"name": name, "storage_path": str(work / "runs"), "steps": 12,
                    "batch_size": 2, "checkpoint_every": 3, "report_every": 1,
                    "preview_every": 100, "max_failures": 1, "cpus_per_worker": 1},
        })  # fmt: skip

    with LocalCluster(CLUSTER_FILE, dashboard=True) as cluster:  # Train V2 needs the State API
        cluster.add(chunk_type, cpus=0)  # servers only: the Train worker must go to the trainer
        trainer = cluster.add(gpu_type)
        clean_job = job("clean")
        clean = load_model_checkpoint(pretrain(clean_job).checkpoint.path)

        lost_job = job("lost")
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["step"] = pretrain(lost_job).metrics["step"]
                outcome["error"] = None
            except Exception as err:  # noqa: BLE001 - reported to the test
                outcome["error"] = f"{type(err).__name__}: {err}"

        thread = threading.Thread(target=run)
        thread.start()
        run_dir = Path(lost_job.run.storage_path) / lost_job.run.name
        deadline = time.monotonic() + 180
        removed = False
        while time.monotonic() < deadline and thread.is_alive():
            if registered_checkpoint(run_dir):  # a checkpoint to resume from: lose the node
                cluster.remove(trainer)
                cluster.add(gpu_type)  # the replacement
                removed = True
                break
            time.sleep(0.05)
        thread.join(timeout=300)
        lost = load_model_checkpoint(run_dir)  # its latest checkpoint
        differ = [k for k, v in clean["state_dict"].items()
                  if not torch.equal(v, lost["state_dict"][k])]  # fmt: skip
        return {
            "removed": removed,
            "error": outcome.get("error", "thread still running"),
            "final_step": outcome.get("step"),
            "clean_step": clean["step"],
            "lost_step": lost["step"],
            "starts": read_starts(lost_job.run),
            "clean_starts": read_starts(clean_job.run),
            "weights_differ": differ,
        }


def tune_node_loss(work: Path) -> dict:
    """A two-trial Tune sweep (neuroray's tune_sweep over a tiny EM fine-tuning job, one trial
    at a time) on two trainer nodes; the node running the first trial's Train worker dies after
    that trial's first checkpoint and a replacement joins. The sweep finishes; the disturbed trial resumed from its
    checkpoint and ends with the validation metric and weights of its undisturbed twin (the two
    trials differ only in ``run.max_failures``, which changes nothing while nothing fails)."""
    import ray
    import torch
    import yaml
    from ray.util.state import list_actors

    from neuroray.config import load_config
    from neuroray.models.checkpoint import load_model_checkpoint
    from neuroray.simcluster import LocalCluster
    from neuroray.tuning.sweeps import SweepJob, tune_sweep

    _, chunk_type, gpu_type = node_types()
    shape = (48, 96, 128)
    layers = em_layers(work, shape=shape)
    encoder = {"size": None, "width": 48, "depth": 2, "heads": 2, "img_size": [16, 64, 64],
               "pos_embed": "learned"}  # fmt: skip
    job = {
        "task": "em",
        "data": {"image": layers["image"], "labels": layers["labels"], "num_servers": 1,
                 "cache_mb": 32, "server_resources": {CHUNK: 1},
                 "sampler": {"crop_shape": [16, 64, 64], "roi": [0, 0, 0, 32, 96, 128]},
                 "augment": "em"},
        "model": {"encoder": encoder, "feature_size": 8},
        "validation": {"roi": [32, 0, 0, 48, 96, 128], "thresholds": [0.5]},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        # epochs of 4 steps: the restart begins an epoch, so it replays the same crops
        "run": {"name": "ft", "storage_path": str(work / "runs"), "batch_size": 2, "steps": 8,
                "checkpoint_every": 4, "report_every": 1, "preview_every": 100,
                "steps_per_epoch": 4, "cpus_per_worker": 1},
    }  # fmt: skip
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    (work / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "nodeloss", "job": str(work / "job.yaml"), "storage_path": str(work / "sweeps"),
        "num_samples": 1, "scheduler": {"name": "fifo"}, "max_concurrent_trials": 1,
        "search_space": {"run.max_failures": {"grid": [1, 2]}},
    }))  # fmt: skip
    sweep = load_config(SweepJob, work / "sweep.yaml")
    train = Path(sweep.experiment_path()) / "train"
    outcome: dict = {}
    with LocalCluster(CLUSTER_FILE, dashboard=True) as cluster:  # Train V2 needs the State API
        cluster.add(chunk_type, cpus=0)  # the shared chunk server only
        trainers = [cluster.add(gpu_type) for _ in range(2)]
        gcs = ray.get_runtime_context().gcs_address  # not auto-detection: other Rays run here

        def run() -> None:
            try:
                outcome["result"] = tune_sweep(sweep)
                outcome["error"] = None
            except Exception as err:  # noqa: BLE001 - reported to the test
                outcome["error"] = f"{type(err).__name__}: {err}"

        thread = threading.Thread(target=run)
        thread.start()
        victim = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and thread.is_alive() and victim is None:
            # trials run one at a time, so the live Train worker is that of the trial whose
            # first checkpoint just appeared
            if any(registered_checkpoint(d) for d in train.glob("*")):
                alive = list_actors(address=gcs, filters=[("state", "=", "ALIVE")])
                on = {a.node_id for a in alive if a.class_name == "RayTrainWorker"}
                victim = next((n for n in trainers if n.node_id in on), None)
                if victim is not None:
                    cluster.remove(victim)  # a trial's worker dies with its node
                    cluster.add(gpu_type)  # the replacement
            time.sleep(0.1)
        thread.join(timeout=420)
        result = outcome.get("result")
        trials = result.trials if result else []
        weights = {t.trial_id: load_model_checkpoint(train / t.trial_id)["state_dict"]
                   for t in trials if t.last_step}  # fmt: skip
        ids = sorted(weights)
        differ = None
        if len(ids) == 2:
            a, b = (weights[i] for i in ids)
            differ = [k for k in a if not torch.equal(a[k], b[k])]
        return {
            "removed": victim is not None,
            "removed_type": victim.type if victim else None,
            "error": outcome.get("error", "thread still running"),
            "trials": {
                t.trial_id: {
                    "status": t.status,
                    "last_step": t.last_step,
                    "value": t.value,
                    "starts": t.starts,
                    "error": t.error,
                }
                for t in trials
            },  # fmt: skip
            "weights_differ": differ,
        }


SCENARIOS = {
    f.__name__: f
    for f in (
        placement,
        chunk_node_loss,
        blockwise_node_loss,
        autoscaling,
        trainer_node_loss,
        tune_node_loss,
    )
}


def main(argv: list[str]) -> int:
    name, work = argv[1], Path(argv[2])
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        result = SCENARIOS[name](work)
    except Exception:
        traceback.print_exc()
        return 1
    result["seconds"] = round(time.monotonic() - started, 1)
    (work / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
