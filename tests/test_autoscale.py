"""Autoscaling from zero, for real: `ray job submit` the tiny pipeline to a cluster whose head
has no CPUs and no GPUs and whose GPU and CPU workers start at zero (Ray's fake multi-node
provider, cluster.yaml's node types: tests/fake_cluster.py), with --out on the localhost S3
server (the job gets the endpoint and credentials through its runtime_env).

Asserts: no GPU node before the job; the collection pool was sized from what the cluster can
scale to (2 GPU workers, published node types: mono.cluster), not from the 0 GPUs at submit,
and both GPU workers were launched on demand; every activation shard (node per shard in the
acts manifest) and every SAE trial (node per trial in trials.json) ran on a GPU worker; one
collection actor on a GPU worker that dies mid-write (MONO_TEST_FAIL_MODE =exit: its process
exits after leaving half a shard) costs nothing: no temporary object is left and every shard
is complete; idle workers are removed afterwards; the artifacts equal the one-node run's
(`tiny_reference`): token shards byte for byte, LM weights to float32 rounding and
activations (same rows) to fp16 rounding, every grid point's SAE trained. Not bit for bit
(measured: LM weights differ in the last float32 bits, activations by <= 2.4e-4 in 0.03% of
values): the job's processes run torch with other thread counts than the pytest process of
the one-node run (Ray sizes a process's threads from its CPU reservation), which sums the
CPU matmuls in another order; --acts.threads_per_actor 1 matches the actors' count.
"""

import re
import time

import pytest
from fake_cluster import FakeCluster, can_run
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
                    # One collection actor on a GPU worker dies mid-write (its process
                    # exits, leaving half a shard): the output must still be complete.
                    acts.FAIL_ONCE_ENV: str(tmp_path), acts.FAIL_MODE_ENV: "exit"}
    job = ["python", "-m", "ray_jobs.pipeline", "--preset", "tiny", "--out", remote,
           "--corpus", str(corpus), "--acts.use_gpu", "true", "--sweep.gpus_per_trial", "1",
           # The one-node run's actors had 1 torch thread each; a GPU actor's default is
           # all cores, which sums the CPU matmuls in another order (other fp16 bits).
           "--acts.threads_per_actor", "1"]
    r, seconds = cluster.submit(job, env, working_dir=False)
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-6000:]

    gpu = cluster.gpu_nodes()
    assert gpu and all(n["t"] > cluster.t_submit for n in gpu.values()), cluster.seen
    # The pool was sized from what the cluster can scale to (2 GPU workers), not from the 0
    # GPUs at submit, and both GPU nodes were requested at once.
    assert re.search(r"collection: \d+ shards to do \(0 already done\), 2 actor\(s\)", logs), \
        logs[-3000:]
    assert len(gpu) == 2, gpu
    assert (tmp_path / "failed").exists(), "the injected actor death did not happen"
    shards = store.acts_manifest(remote)["files"]
    assert not [k for k in s3.keys(remote.split("/")[2], "run/acts/") if ".tmp-" in k]
    assert {f["node"] for f in shards} <= set(gpu), (shards, gpu)
    trials = store.read_json(store.join(remote, "sweep", "sweep", "trials.json"))["trials"]
    assert {t["node"] for t in trials} <= set(gpu), (trials, gpu)
    assert_same_artifacts(local, remote, exact_acts=False)

    t0 = time.perf_counter()
    assert cluster.wait_idle_workers_gone(timeout=120), cluster.nodes()
    first_gpu = min(n["t"] for n in gpu.values()) - cluster.t_submit
    print(f"fake cluster: first GPU worker {first_gpu:.1f} s after submit, job {seconds:.1f} s, "
          f"{len(gpu)} GPU worker(s), {len({f['node'] for f in shards})} collecting; idle "
          f"workers gone {time.perf_counter() - t0:.1f} s after the job")
