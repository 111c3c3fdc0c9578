"""Benchmark: a Tune sweep of 4 SAE trials run concurrently vs the same 4 one after another.

    .venv/bin/python bench/sweep.py                  # ~2 min on 2 cores
    .venv/bin/python bench/sweep.py --steps 400 --n_features 8192
    .venv/bin/python bench/sweep.py --demo           # the demo preset's sweep, demo-shaped data

Builds a small run once in a temp dir (synthetic token shards, the tiny LM trained for a few
steps, activation shards through mono.acts.run: H 128), then runs the real path,
`mono.sweep.run`, on its own `ray.init(address="local", num_cpus=<cores>)`, twice on the same
2 x 2 grid: all 4 trials at once with cores/4 CPUs each (torch gets 1 thread per trial),
and one at a time with every core. Prints wall time, aggregate samples/s (4 x steps x
batch / wall), the trials' own training samples/s, per-trial start-up (trainable entry to
the first training step, `setup_s`) and the rest of the wall time: Ray/Tune scheduling,
actor start, evals, checkpoints. With CUDA, also 4 trials at gpus_per_trial=0.25 vs 1 trial
on the whole GPU (aggregate samples/s of the packed four over the one).

--demo times the demo preset's own sweep (its grid, SAE and sweep sections unchanged) on a
demo-shaped run: synthetic tokens in the demo's shape (4,700 train contexts of T 128), the
demo LM (128/512) trained a few steps (the SAE's speed does not depend on the LM's quality),
its activation shards (64 positions per context: ~300 k rows, H 512).

Measured 2026-11-27 on the 2-core build machine, idle, defaults (4 trials x 100 steps x
batch 1024, SAE 128 -> 2048; `.venv/bin/python bench/sweep.py`, 1 min 47 s):
  concurrent_4  wall 32.6 s, aggregate 12,583 samples/s, 11,300 per trial (1 thread each)
  sequential_4  wall 48.4 s, aggregate  8,464 samples/s, 34,154 per trial (2 threads)
  ratio 1.49; start-up (entry -> first step) 1.0 s / 0.4 s; most of each wall is neither
  training nor start-up (22 s / 36 s): trial processes starting, the pool, evals,
  checkpoints, Tune. Earlier the same day at load 9-14: ratio 1.05 (52.2 s vs 55.0 s).
At this size the fixed costs dominate; the ratio measures scheduling more than compute.
The demo preset's sweep inside `python -m ray_jobs.pipeline` (2 trials x 1200 steps x batch
1024, F 1024, H 512, both at once): 168 s on idle cores. The GPU rows (4 trials at
gpus_per_trial 0.25 vs 1 trial) were not measured: no GPU machine was lent to this task.
"""

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
import ray
import torch

from mono import acts, store, sweep, train_lm
from mono.config import PRESETS, with_overrides


def build_run(out: str, n_ctx: int, preset: str = "tiny") -> None:
    """Token shards (a noisy cycle over 16 ids), the preset's LM, activation shards."""
    base = PRESETS[preset]
    T = base.tokens.ctx_len
    rng = np.random.default_rng(0)
    ids = rng.permutation(50000)[:16] + 100
    splits = {}
    for split, n in (("train", n_ctx), ("val", max(16, base.sae.eval_contexts))):
        steps = np.where(rng.random(n * T) < 0.05, rng.integers(1, 16, n * T), 1)
        toks = ids[np.cumsum(steps) % 16].reshape(n, T)
        store.write_table_atomic(store.join(store.Layout(out).tokens(split), "part-00000.parquet"),
                                 store.token_table(np.arange(n), toks))
        splits[split] = {"rows": n, "tokens": n * T,
                         "files": [{"name": "part-00000.parquet", "first": 0, "rows": n}]}
    store.write_json(store.Layout(out).tokens_manifest, {
        "tokenizer": "synthetic", "ctx_len": T, "dtype": "uint16", "tokens_sha256": "bench",
        "rows": {s: v["rows"] for s, v in splits.items()}, "splits": splits})
    acts_cfg = {"tokens_per_context": 32} if preset == "tiny" else {}
    cfg = with_overrides(base, out=out, acts=acts_cfg,
                         train_lm={"max_iters": 6, "batch_size": 4, "eval_interval": 6})
    train_lm.train(cfg)
    acts.run(cfg)


def sweep_once(base, name: str, **sweep_fields) -> dict:
    cfg = replace(base, sweep=replace(base.sweep, name=name, **sweep_fields))
    t0 = time.perf_counter()
    summary = sweep.run(cfg)
    wall = time.perf_counter() - t0
    trials = summary["trials"]
    samples = sum(t["metrics"]["examples"] for t in trials)
    return {"mode": name, "trials": len(trials), "wall_s": wall, "agg": samples / wall,
            "trial_sps": statistics.mean(t["metrics"]["samples_per_s"] for t in trials),
            "setup_s": statistics.mean(t["last_report"]["setup_s"] for t in trials),
            "train_s": sum(t["metrics"]["examples"] / t["metrics"]["samples_per_s"]
                           for t in trials),
            "steps": trials[0]["metrics"]["step"]}


def demo(out: str) -> None:
    """The demo preset's sweep as the pipeline runs it (default resources), timed."""
    if not store.exists(store.Layout(out).acts_manifest):
        t0 = time.perf_counter()
        build_run(out, 4700, "demo")
        print(f"built a demo-shaped run in {out} in {time.perf_counter() - t0:.0f} s")
    cfg = replace(PRESETS["demo"], out=out)
    r = sweep_once(cfg, "demo")
    print(f"demo sweep: {r['trials']} trials ({len(cfg.sweep.l1_coeff)} l1 x "
          f"{len(cfg.sweep.lr)} lr) x {r['steps']} steps x batch {cfg.sae.batch_size}, "
          f"F {cfg.sae.n_features}: wall {r['wall_s']:.0f} s, trial samples/s "
          f"{r['trial_sps']:,.0f}, setup {r['setup_s']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="SAE steps per trial")
    ap.add_argument("--n_features", type=int, default=2048)
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--contexts", type=int, default=512, help="train contexts (x32 rows)")
    ap.add_argument("--out", default="", help="run dir to build/reuse (default: a temp dir)")
    ap.add_argument("--demo", action="store_true", help="time the demo preset's sweep instead")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))  # taskset-aware
    gpus = torch.cuda.device_count()
    out = args.out or tempfile.mkdtemp(prefix="bench-sweep-")
    ray.init(address="local", num_cpus=cores, num_gpus=gpus, include_dashboard=False,
             log_to_driver=False, object_store_memory=512 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if args.demo:
        demo(out)
        ray.shutdown()
        return
    if not store.exists(store.Layout(out).acts_manifest):
        t0 = time.perf_counter()
        build_run(out, args.contexts)
        print(f"built {out} in {time.perf_counter() - t0:.0f} s")
    base = with_overrides(
        PRESETS["tiny"], out=out,
        sae={"n_features": args.n_features, "batch_size": args.batch_size,
             "n_steps": args.steps, "resample_at": (args.steps // 2,), "dead_window": 20,
             "eval_interval": args.steps, "checkpoint_interval": args.steps,
             "resample_inputs": 4096, "device": "cpu"},
        sweep={"l1_coeff": (1e-3, 3e-3), "lr": (1e-3, 3e-3), "pool_rows": 8192,
               "max_failures": 0})
    rows = [sweep_once(base, "concurrent_4", cpus_per_trial=cores / 4,
                       max_concurrent_trials=4),
            sweep_once(base, "sequential_4", cpus_per_trial=cores, max_concurrent_trials=1)]
    if gpus:
        gpu = replace(base, sae=replace(base.sae, device="cuda"))
        rows += [sweep_once(gpu, "gpu_4x0.25", cpus_per_trial=1, gpus_per_trial=0.25,
                            max_concurrent_trials=4),
                 sweep_once(replace(gpu, sweep=replace(gpu.sweep, l1_coeff=(1e-3,),
                                                       lr=(1e-3,))),
                            "gpu_1x1", cpus_per_trial=1, gpus_per_trial=1.0)]
    ray.shutdown()
    print(f"\n{cores} cores, {gpus} GPU(s); 4 trials x {args.steps} steps x batch "
          f"{args.batch_size}, SAE 128 -> {args.n_features}")
    print(f"{'mode':<14}{'trials':>7}{'wall s':>9}{'agg samples/s':>15}{'trial samples/s':>17}"
          f"{'setup s':>9}{'other s':>9}")
    for r in rows:
        width = 4 if r["mode"] == "concurrent_4" or r["mode"] == "gpu_4x0.25" else 1
        other = r["wall_s"] - r["train_s"] / width - r["setup_s"]
        print(f"{r['mode']:<14}{r['trials']:>7}{r['wall_s']:>9.1f}{r['agg']:>15,.0f}"
              f"{r['trial_sps']:>17,.0f}{r['setup_s']:>9.1f}{other:>9.1f}")
    print(f"concurrent / sequential aggregate samples/s: {rows[0]['agg'] / rows[1]['agg']:.2f}")
    if gpus:
        print(f"4 x 0.25 GPU / 1 trial on the GPU, aggregate samples/s: "
              f"{rows[2]['agg'] / rows[3]['agg']:.2f}")


if __name__ == "__main__":
    main()
