"""Autoscaling from zero, for real: `ray job submit` the tiny pipeline to a cluster whose head
has no CPUs and no GPUs and whose GPU and CPU workers start at zero (Ray's fake multi-node
provider, cluster.yaml's node types: tests/fake_cluster.py), with --out on the localhost S3
server (the job gets the endpoint and credentials through its runtime_env).

Asserts: no GPU node before the job; the collection pool was sized from what the cluster can
scale to (2 GPU workers, published node types: mono.cluster), not from the 0 GPUs at submit,
and both GPU workers were launched on demand; every activation shard (node per shard in the
acts manifest) and every SAE trial (node per trial in trials.json) ran on a GPU worker.

A GPU worker is terminated mid-collection, as a cloud reclaims a spot node: one collection
actor hangs with half a shard written (MONO_TEST_FAIL_MODE=hang), and the test SIGKILLs every
process of its node at once (raylet and object store, agents, workers). The autoscaler
replaces the node, the shard is redone on another one, no temporary object is left, and the
artifacts equal the one-node run's (`tiny_reference`) bit for bit: token and activation
shards, LM and SAE weights, every trial's metrics, the analysis table. (They did not before
mono/threads.py: the job's driver trained the LM on 1 thread, where the one-node run used 2.)
Idle workers are removed afterwards.
"""

import re
import time

import pytest
from fake_cluster import FakeCluster, can_run, terminate_when_hung
from test_s3 import assert_same_artifacts

from mono import acts, store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def cluster():
    why = can_run()
    if why:
        pytest.skip(why)
    c = FakeCluster(max_workers={"gpu_worker": 2, "cpu_worker": 1}).start()
    try:
        yield c
    finally:
        c.stop()


def test_tiny_pipeline_scales_gpu_workers_from_zero(cluster, s3, tiny_reference, tmp_path):
    local, corpus = tiny_reference
    remote = f"s3://{s3.bucket()}/run"
    assert not cluster.gpu_nodes(), "GPU nodes before any demand"
    env = s3.env | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
                    # One collection actor on a GPU worker hangs mid-write (leaving half a
                    # shard) until the test terminates its whole node.
                    acts.FAIL_ONCE_ENV: str(tmp_path), acts.FAIL_MODE_ENV: "hang"}
    job = ["python", "-m", "ray_jobs.pipeline", "--preset", "tiny", "--out", remote,
           "--corpus", str(corpus), "--acts.use_gpu", "true", "--sweep.gpus_per_trial", "1"]
    terminated: dict = {}
    watcher = terminate_when_hung(cluster, tmp_path / "failed", terminated)
    r, seconds = cluster.submit(job, env, working_dir=False)
    watcher.join(timeout=5)
    logs = r.stdout + r.stderr
    assert terminated.get("node"), ("the injected hang did not happen", logs[-3000:])
    assert terminated["node"] not in terminated["drivers"], terminated  # placement changed?
    # Its raylet, its two agents and the hung actor's worker at least.
    assert len(terminated["killed"]) >= 4 and terminated["pid"] in terminated["killed"], \
        terminated
    assert r.returncode == 0, logs[-6000:]

    gpu = cluster.gpu_nodes()
    assert all(n["t"] > cluster.t_submit for n in gpu.values()), cluster.seen
    assert gpu[terminated["node"]]["state"] == "DEAD", gpu
    # The pool was sized from what the cluster can scale to (2 GPU workers), not from the 0
    # GPUs at submit, and both GPU nodes were requested at once; the terminated one was
    # replaced (a third GPU node, never more than 2 alive).
    assert re.search(r"collection: \d+ shards to do \(0 already done\), 2 actor\(s\)", logs), \
        logs[-3000:]
    assert len(gpu) >= 2, gpu
    shards = store.acts_manifest(remote)["files"]
    assert not [k for k in s3.keys(remote.split("/")[2], "run/acts/") if ".tmp-" in k]
    assert {f["node"] for f in shards} <= set(gpu), (shards, gpu)
    redone = [f for f in shards if f["name"] == terminated["shard"]]
    assert redone and redone[0]["node"] != terminated["node"], (redone, terminated)
    trials = store.read_json(store.join(remote, "sweep", "sweep", "trials.json"))["trials"]
    assert {t["node"] for t in trials} <= set(gpu), (trials, gpu)
    # Bit for bit the one-node run's: token and activation shards, LM and SAE weights, every
    # trial's metrics, the analysis table.
    assert_same_artifacts(local, remote)

    t0 = time.perf_counter()
    assert cluster.wait_idle_workers_gone(timeout=120), cluster.nodes()
    first_gpu = min(n["t"] for n in gpu.values()) - cluster.t_submit
    print(f"fake cluster: first GPU worker {first_gpu:.1f} s after submit, job {seconds:.1f} s, "
          f"{len(gpu)} GPU worker(s) (1 terminated mid-collection, "
          f"{terminated['t'] - cluster.t_submit:.1f} s after submit), "
          f"{len({f['node'] for f in shards})} collecting; idle workers gone "
          f"{time.perf_counter() - t0:.1f} s after the job")
