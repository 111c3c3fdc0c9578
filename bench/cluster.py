"""Cluster and object-storage figures, measured side by side in one run:

1. The training reader (`mono.reader.ActsReader`, what train_sae streams) over the same
   activation shards on the localhost S3 server (moto) and on local disk: rows/s each, and
   the ratio. Synthetic shards in the activation schema (`--rows`, `--d_mlp`, fp16, zstd).
2. The tiny pipeline submitted (`ray job submit`) to Ray's fake autoscaling cluster with
   cluster.yaml's node types (tests/fake_cluster.py; head without CPUs or GPUs, GPU workers
   from zero), --out on the S3 server: seconds from submit to the first GPU worker and to
   the job's end, the collection pool size the job reached, GPU workers launched, and the
   seconds until the idle workers were removed after the job. Then the same job again from
   zero with a GPU worker terminated mid-collection: seconds to its replacement and to the
   job's end, beside the undisturbed job's, and its artifacts checked bit for bit against
   the undisturbed run's.

    python bench/cluster.py                 # both
    python bench/cluster.py --skip_cluster  # the reader only (~20 s)

The box is shared and 2-core: all figures are noisy; moto keeps objects in memory and
serves them from this machine, so the S3 figure is a lower bound on protocol overhead, not
a cloud bandwidth figure.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def start_s3() -> dict:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    return env


def write_shards(local_dir: str, rows: int, d_mlp: int, n_shards: int) -> list[str]:
    from mono import store

    rng = np.random.default_rng(0)
    per = rows // n_shards
    paths = []
    for i in range(n_shards):
        acts = np.maximum(rng.standard_normal((per, d_mlp), dtype=np.float32), 0)
        table = store.acts_table(np.arange(per) + i * per, np.zeros(per), np.zeros(per),
                                 acts.astype(np.float16), "float16")
        path = store.join(local_dir, store.acts_shard_name(i * per))
        store.write_acts_shard(path, table, "zstd", 4096)
        paths.append(path)
    return paths


def read_rate(files: list[str], batch: int) -> tuple[float, int]:
    from mono.reader import ActsReader

    t0, n = time.perf_counter(), 0
    for x in ActsReader(files, batch, shuffle_buffer=65_536):
        n += len(x[0] if isinstance(x, tuple) else x)
    return n / (time.perf_counter() - t0), n


def bench_reader(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="bench-cluster-")
    local = write_shards(tmp, args.rows, args.d_mlp, args.shards)
    fs, _ = pafs.FileSystem.from_uri("s3://bench/acts")
    pafs.copy_files(tmp, "bench/acts", destination_filesystem=fs)
    remote = [f"s3://bench/acts/{os.path.basename(p)}" for p in local]
    rates = {"local": [], "s3": []}
    for _ in range(args.repeats):   # interleaved, so load changes hit both alike
        for name, files in (("local", local), ("s3", remote)):
            rate, n = read_rate(files, args.batch)
            rates[name].append(rate)
    best = {k: max(v) for k, v in rates.items()}
    mb = sum(os.path.getsize(p) for p in local) / 1e6
    print(f"reader: {args.rows} rows x H {args.d_mlp} fp16 in {args.shards} shards "
          f"({mb:.1f} MB zstd), batch {args.batch}: local {best['local'] / 1e3:.0f} k rows/s, "
          f"s3 (moto, 127.0.0.1) {best['s3'] / 1e3:.0f} k rows/s, s3/local "
          f"{best['s3'] / best['local']:.2f} (best of {args.repeats})")
    return best


def _job(c, s3_env: dict, corpus, out: str, extra_env: dict | None = None):
    """Submit the tiny pipeline to `c` with --out `out`; -> (logs, seconds to the job's end)."""
    env = s3_env | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    job = ["python", "-m", "ray_jobs.pipeline", "--preset", "tiny", "--out", out,
           "--corpus", str(corpus), "--acts.use_gpu", "true", "--sweep.gpus_per_trial", "1"]
    r, job_s = c.submit(job, env | (extra_env or {}), working_dir=False)
    logs = r.stdout + r.stderr
    if r.returncode != 0:
        print(logs[-4000:])
        raise SystemExit(f"fake cluster job ({out}) failed")
    return logs, job_s


def bench_cluster(args, s3_env: dict) -> dict:
    from fake_cluster import FakeCluster, can_run, terminate_when_hung
    from test_pipeline import _corpus
    from test_s3 import assert_same_artifacts

    from mono import acts

    why = can_run()
    if why:
        print(f"fake cluster: skipped ({why})")
        return {}
    import boto3

    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="run")
    corpus = _corpus(Path(tempfile.mkdtemp(prefix="bench-corpus-")) / "corpus.txt")
    c = FakeCluster(max_workers={"gpu_worker": 2, "cpu_worker": 1})
    t0 = time.perf_counter()
    c.start()
    head_s = time.perf_counter() - t0
    try:
        # 1. From zero, undisturbed.
        logs, job_s = _job(c, s3_env, corpus, "s3://run/tiny")
        gpu = c.gpu_nodes()
        first_gpu = min(n["t"] for n in gpu.values()) - c.t_submit
        pool = re.search(r"collection: \d+ shards to do \(\d+ already done\), (\d+) actor", logs)
        t1 = time.perf_counter()
        gone = c.wait_idle_workers_gone(timeout=180)
        idle_s = time.perf_counter() - t1
        # 2. From zero again, a GPU worker terminated mid-collection (every process of it
        # SIGKILLed while one actor is half-way through a shard).
        marker, seen = Path(tempfile.mkdtemp(prefix="bench-fail-")), set(c.gpu_nodes())
        killed: dict = {}
        watcher = terminate_when_hung(c, marker / "failed", killed)
        _, kill_job_s = _job(c, s3_env, corpus, "s3://run/tiny-kill",
                             {acts.FAIL_ONCE_ENV: str(marker), acts.FAIL_MODE_ENV: "hang"})
        watcher.join(timeout=5)
        if not killed.get("killed"):
            raise SystemExit(f"no GPU worker was terminated: {killed}")
        later = [n["t"] for k, n in c.gpu_nodes().items() if k not in seen and n["t"] > killed["t"]]
        replaced = min(later) - killed["t"] if later else None
        assert_same_artifacts("s3://run/tiny", "s3://run/tiny-kill")   # raises if not
        c.wait_idle_workers_gone(timeout=180)
    finally:
        c.stop()
    print(f"fake cluster: head up {head_s:.1f} s; first GPU worker {first_gpu:.1f} s after "
          f"submit; job end {job_s:.1f} s after submit; collection pool "
          f"{pool.group(1) if pool else '?'} actor(s); {len(gpu)} GPU worker(s) launched; "
          f"idle workers {'removed' if gone else 'NOT removed'} {idle_s:.1f} s after the job")
    up = f"{replaced:.1f} s" if replaced is not None else "never"
    print(f"fake cluster, a GPU worker terminated mid-collection "
          f"({killed['t'] - c.t_submit:.1f} s after submit, {len(killed['killed'])} processes): "
          f"replacement GPU worker up "
          f"{up} later; job end "
          f"{kill_job_s:.1f} s after submit ({kill_job_s / job_s:.2f}x the undisturbed job); "
          f"artifacts bit-identical to the undisturbed run's")
    return {"first_gpu_s": first_gpu, "job_s": job_s, "pool": pool and int(pool.group(1)),
            "kill_job_s": kill_job_s, "replaced_s": replaced}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--d_mlp", type=int, default=512)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip_cluster", action="store_true")
    args = p.parse_args()
    s3_env = start_s3()
    bench_reader(args)
    if not args.skip_cluster:
        bench_cluster(args, s3_env)


if __name__ == "__main__":
    main()
