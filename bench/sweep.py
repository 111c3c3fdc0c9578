"""Benchmark: packed SAEs vs separate runs on the same data; reader rows/s per core; draws.

    .venv/bin/python bench/sweep.py                  # ~1 min on 2 idle cores, ~3-4 loaded
    .venv/bin/python bench/sweep.py --k 4 --steps 200 --n_features 2048

Builds a small run once in a temp dir (synthetic token shards, the tiny LM trained for a few
steps, activation shards through mono.acts.run: H 128), then measures, side by side in one
invocation on the same shards, each mode in its own fresh process (so peak RSS and bytes
read are the mode's alone):

- pack_K: one `mono.pack.train_pack` of K SAEs (K l1 values) on one stream;
- separate_K: the same K SAEs as K `train_sae.train` runs, one after another (what K
  one-SAE trials read);
- alone_1: one SAE.
  Per mode: aggregate SAE samples/s (K x steps x batch / wall, evals and start-up
  included), bytes read from the activation shards per SAE sample (counted under pyarrow:
  the training stream, the b_dec sample and the resampling draws), peak RSS (ru_maxrss).
- reader: `ActsReader` alone over the local Parquet shards (zstd), rows per CPU-second
  (process time, 1 torch thread), next to the H100 step's 1.86 M samples/s (mono.sae): how
  many cores feed one GPU with one SAE per read and with K packed.
- draws: 4 concurrent clients (what 4 trials do at a resample step) asking the
  ResampleService for one step's draw: bytes moved per trial (the object each maps; one
  fetch per node) and the longest wait.

Timings on the shared 2-core build box are noisy (other engineers' jobs run alongside);
ratios measured side by side are what to read.
"""

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace

import numpy as np

H100_SAMPLES_PER_S = 1.86e6
"""One paper-shaped SAE step on an H100 (mono.sae's docstring, measured on a lent machine)."""


def build_run(out: str, n_ctx: int) -> None:
    """Token shards (a noisy cycle over 16 ids), the tiny LM, activation shards."""
    from mono import acts, store, train_lm
    from mono.config import PRESETS, with_overrides

    base = PRESETS["tiny"]
    T = base.tokens.ctx_len
    rng = np.random.default_rng(0)
    ids = rng.permutation(50000)[:16] + 100
    splits = {}
    for split, n in (("train", n_ctx), ("val", 16)):
        steps = np.where(rng.random(n * T) < 0.05, rng.integers(1, 16, n * T), 1)
        toks = ids[np.cumsum(steps) % 16].reshape(n, T)
        store.write_table_atomic(store.join(store.Layout(out).tokens(split), "part-00000.parquet"),
                                 store.token_table(np.arange(n), toks))
        splits[split] = {"rows": n, "tokens": n * T,
                         "files": [{"name": "part-00000.parquet", "first": 0, "rows": n}]}
    store.write_json(store.Layout(out).tokens_manifest, {
        "tokenizer": "synthetic", "ctx_len": T, "dtype": "uint16", "tokens_sha256": "bench",
        "rows": {s: v["rows"] for s, v in splits.items()}, "splits": splits})
    cfg = with_overrides(base, out=out, acts={"tokens_per_context": 32, "max_actors": 1},
                         train_lm={"max_iters": 6, "batch_size": 4, "eval_interval": 6})
    train_lm.train(cfg)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    acts.run(cfg)
    ray.shutdown()


def base_cfg(out: str, args):
    from mono.config import PRESETS, with_overrides

    return with_overrides(
        PRESETS["tiny"], out=out,
        sae={"n_features": args.n_features, "batch_size": args.batch_size,
             "n_steps": args.steps, "resample_at": (args.steps // 2,), "dead_window": 20,
             "eval_interval": args.steps, "checkpoint_interval": args.steps,
             "resample_inputs": 4096, "eval_contexts": 4, "device": "cpu"})


class CountingFile(io.RawIOBase):
    """A file that counts the bytes read through it (pyarrow reads the shards via it)."""

    total = 0

    def __init__(self, native):
        self.f = native

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self.f.seek(pos, whence)

    def tell(self):
        return self.f.tell()

    def size(self):
        return self.f.size()

    def readinto(self, b):
        data = self.f.read(len(b))
        b[:len(data)] = data
        CountingFile.total += len(data)
        return len(data)


def count_shard_reads() -> None:
    """Route mono.reader's shard opens (the training stream, its b_dec sample, the
    resampling draws) through CountingFile."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mono import reader, store

    def counted(path):
        fs, p = store.resolve(path)
        return pq.ParquetFile(pa.PythonFile(CountingFile(fs.open_input_file(p)), mode="r"))

    reader._open = counted


def run_mode(args) -> dict:
    """One mode in this (fresh) process -> its figures."""
    import torch

    from mono import pack, train_sae

    torch.set_num_threads(args.threads)
    count_shard_reads()
    cfg = base_cfg(args.out, args)
    l1s = [1e-3 * 2**i for i in range(args.k)]
    work = tempfile.mkdtemp(prefix=f"bench-{args.mode}-", dir=args.out)
    t0 = time.perf_counter()
    if args.mode == "pack":
        pack.train_pack(cfg, [{"l1_coeff": l1, "lr": 1e-3} for l1 in l1s], work)
        n = args.k
    elif args.mode == "separate":
        for i, l1 in enumerate(l1s):
            train_sae.train(replace(cfg, sae=replace(cfg.sae, l1_coeff=l1, lr=1e-3)),
                            os.path.join(work, str(i)))
        n = args.k
    else:
        train_sae.train(cfg, os.path.join(work, "0"))
        n = 1
    wall = time.perf_counter() - t0
    samples = n * args.steps * args.batch_size
    return {"mode": f"{args.mode}_{n}", "saes": n, "wall_s": wall, "agg": samples / wall,
            "bytes_per_sample": CountingFile.total / samples,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def reader_rate(out: str, batch_size: int) -> dict:
    """ActsReader alone: rows per CPU-second over one pass (1 torch thread)."""
    import torch

    from mono.reader import ActsReader

    torch.set_num_threads(1)
    reader = ActsReader(out, batch_size, seed=0, shuffle_buffer=8192)
    c0, t0, rows = time.process_time(), time.perf_counter(), 0
    for x in reader:
        rows += len(x)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"rows": rows, "rows_per_cpu_s": rows / cpu, "rows_per_s": rows / wall,
            "cpu_per_wall": cpu / wall}


def draw_waits(out: str, n: int) -> dict:
    """4 clients ask the service for one step's draw at once."""
    import ray

    from mono import resample, store

    H = store.acts_manifest(out)["H"]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = resample.start_service(out, "bench-draws", 0, (100, 200), n, H)
        waits, sizes = [], []

        def trial():
            t0 = time.perf_counter()
            x = resample.source_at(resample.SharedDraw(handle), 100).sample(n)
            waits.append(time.perf_counter() - t0)
            sizes.append(x.nbytes)

        time.sleep(0.5)   # the service computes step 100's draw ahead of the trials
        threads = [threading.Thread(target=trial) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = ray.get(handle.stats.remote())
        ray.kill(handle, no_restart=True)
    finally:
        ray.shutdown()
    return {"bytes_per_trial": max(sizes), "max_wait_s": max(waits),
            "computed": stats["computed"], "served": stats["served"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4, help="SAEs per pack")
    ap.add_argument("--steps", type=int, default=60, help="SAE steps per SAE")
    ap.add_argument("--n_features", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--contexts", type=int, default=2048, help="train contexts (x32 rows)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", default="", help="run dir to build/reuse (default: a temp dir)")
    ap.add_argument("--mode", default="", help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    from mono import store

    args.out = args.out or tempfile.mkdtemp(prefix="bench-sweep-")
    if not store.exists(store.Layout(args.out).acts_manifest):
        t0 = time.perf_counter()
        build_run(args.out, args.contexts)
        print(f"built {args.out} in {time.perf_counter() - t0:.0f} s")
    rows_total = store.acts_manifest(args.out)["rows"]
    # The activation mean (acts/mean.json) is computed once per dataset and cached: compute
    # it here, or the first mode measured pays its full read of the shards alone.
    from mono import train_sae

    train_sae.check_inputs(base_cfg(args.out, args))
    if args.steps * args.batch_size > rows_total:
        sys.exit(f"{args.steps} steps x {args.batch_size} > the {rows_total} rows")
    rows = []
    for mode in ("pack", "separate", "alone"):
        cmd = [sys.executable, __file__, "--mode", mode, "--out", args.out, "--k", str(args.k),
               "--steps", str(args.steps), "--n_features", str(args.n_features),
               "--batch_size", str(args.batch_size), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    rate = reader_rate(args.out, args.batch_size)
    draws = draw_waits(args.out, 4096)

    print(f"\n{args.threads} threads; K={args.k} SAEs x {args.steps} steps x batch "
          f"{args.batch_size}, SAE 128 -> {args.n_features}, {rows_total:,} rows")
    print(f"{'mode':<12}{'SAEs':>5}{'wall s':>9}{'agg SAE samples/s':>19}"
          f"{'shard bytes/SAE sample':>24}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['mode']:<12}{r['saes']:>5}{r['wall_s']:>9.1f}{r['agg']:>19,.0f}"
              f"{r['bytes_per_sample']:>24,.1f}{r['rss_mb']:>13,.0f}")
    pk, sep, one = rows
    print(f"pack / separate: aggregate samples/s {pk['agg'] / sep['agg']:.2f}x, bytes read per "
          f"SAE sample {pk['bytes_per_sample'] / sep['bytes_per_sample']:.2f} "
          f"(target 1/K = {1 / args.k:.2f}), peak RSS {pk['rss_mb'] / sep['rss_mb']:.2f}x")
    print(f"alone: {one['agg']:,.0f} samples/s")
    per_core = rate["rows_per_cpu_s"]
    print(f"reader (local Parquet, zstd, H 128): {per_core:,.0f} rows per CPU-second "
          f"({rate['rows_per_s']:,.0f} rows/s wall at {rate['cpu_per_wall']:.2f} cores); "
          f"H100 step {H100_SAMPLES_PER_S / 1e6:.2f} M samples/s needs "
          f"{H100_SAMPLES_PER_S / per_core:.1f} cores per GPU with one SAE per read, "
          f"{H100_SAMPLES_PER_S / args.k / per_core:.1f} with {args.k} packed (if the packed "
          f"step runs at 1.86 M / {args.k} rows/s) and {H100_SAMPLES_PER_S / 16 / per_core:.1f}"
          f" with 16")
    print(f"draws, 4 concurrent trials at one resample step: {draws['bytes_per_trial'] / 1e6:.2f}"
          f" MB moved per trial (one object, computed {draws['computed']}x for "
          f"{draws['served']} requests), longest wait {draws['max_wait_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
