"""Benchmark stage 3 (activation collection) and the training reader, side by side.

    .venv/bin/python bench/collect.py            # ~2-3 min on 2 cores
    .venv/bin/python bench/collect.py --contexts 192 --rounds 1   # quicker

Paper-shaped LM (d_model 128, d_mlp 512, 4 heads) with random weights saved as an lm/
checkpoint, synthetic token shards at T=1024, 200 positions per context, 8 contexts per
LM batch (the seed measured 36.7 k vectors/s here with its own code at that batch).

(a) vectors/s of the whole stage (`acts.run`: Ray actor reads tokens, runs the LM, shuffles,
    writes Parquet) vs the seed's method on the same model (every position up to the GELU,
    then gather 200; target >= 2x) and vs `Lm.mlp_acts(idx, positions)` alone (target
    >= 0.8). Each round times the two in-process methods, then a stage run; medians over
    rounds. The stage's rate is its steady state after the first shard (actor start-up and
    LM loading excluded; the wall time including them is printed too).
(b) peak RSS with 10x the contexts vs 1x (target <= 1.2), each collection in its own
    subprocess with its own Ray; /proc VmHWM polled every 50 ms for the driver and every
    descendant (Ray workers are separate processes): driver, the collection actor
    (ray::MapWorker) and the sum over all Ray workers (idle ones included, so it moves with
    how many workers Ray happened to start). 1x is 2 shards, so the actor's overlap of one
    shard's write with the next one's compute is in both.
(c) bytes on disk per row vs raw fp16 (H * 2 bytes; target <= 1.05), the same shard
    rewritten with compression none and zstd.
(d) ActsReader rows/s (batch 8192, shuffle_buffer 262,144) vs a plain float32 SAE step's
    consumption at batch 8192, H 512, F 4096 (target >= 5x); distinct contexts in a batch of
    8192 vs a perfect shuffle (target >= 0.9) on the paper's shard geometry (1024 contexts x
    200 rows per shard, row groups of 4096; acts reduced to H=1 to keep it small).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Set before torch loads OpenMP (Ray workers inherit it): on a shared, oversubscribed box,
# spinning OpenMP threads cost the in-process timings up to 6x (measured here) and make the
# side-by-side ratios meaningless; on a quiet machine it changes little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _rss import descendants, hwm_kb  # bench/ is on sys.path when run as a script

from mono import acts, store  # noqa: E402
from mono.config import PRESETS, with_overrides  # noqa: E402
from mono.lm import Lm  # noqa: E402
from mono.reader import ActsReader  # noqa: E402

T, P, BATCH = 1024, 200, 8


def make_run(out: str, n_ctx: int, seed: int = 0) -> Lm:
    """Token shards (T=1024) + a random paper-shaped LM checkpoint under out."""
    tokens = np.random.default_rng(seed).integers(0, 50257, (n_ctx, T))
    files = []
    for first in range(0, n_ctx, 256):
        name = f"part-{len(files):05d}.parquet"
        rows = tokens[first:first + 256]
        store.write_table_atomic(store.join(store.Layout(out).tokens("train"), name),
                                 store.token_table(np.arange(first, first + len(rows)), rows))
        files.append({"name": name, "first": first, "rows": len(rows)})
    store.write_json(store.Layout(out).tokens_manifest, {
        "ctx_len": T, "rows": {"train": n_ctx, "val": 0},
        "splits": {"train": {"rows": n_ctx, "files": files}, "val": {"rows": 0, "files": []}}})
    torch.manual_seed(seed)
    lm = Lm(bench_cfg(out).lm).eval()  # the paper preset's 128 / 512, block 1024
    store.save_lm(store.Layout(out).lm, lm, bench_cfg(out))
    return lm


def bench_cfg(out: str, **acts_overrides):
    base = PRESETS["paper"]
    return with_overrides(base, out=out, acts={
        "tokens_per_context": P, "n_contexts": 0, "batch_contexts": BATCH,
        "shard_contexts": 64, "use_gpu": False, "cpus_per_actor": 1} | acts_overrides)


# --- (a) throughput --------------------------------------------------------------------


def seed_method(lm: Lm, tokens: np.ndarray, positions: np.ndarray) -> float:
    """vectors/s: every position up to the GELU, then gather P (the seed's get_gelu_acts)."""
    start = time.perf_counter()
    for s in range(0, len(tokens), BATCH):
        idx = torch.from_numpy(tokens[s:s + BATCH])
        full = lm.mlp_acts(idx)                                          # (B, T, H)
        pos = torch.from_numpy(positions[s:s + BATCH])
        full.gather(1, pos[..., None].expand(-1, -1, full.shape[2])).half().numpy()
    return positions.size / (time.perf_counter() - start)


def compute_alone(lm: Lm, tokens: np.ndarray, positions: np.ndarray) -> float:
    """vectors/s of Lm.mlp_acts(idx, positions), nothing else."""
    start = time.perf_counter()
    for s in range(0, len(tokens), BATCH):
        lm.mlp_acts(torch.from_numpy(tokens[s:s + BATCH]),
                    torch.from_numpy(positions[s:s + BATCH]))              # (B, P, H)
    return positions.size / (time.perf_counter() - start)


def throughput(root: str, n_ctx: int, rounds: int) -> dict:
    """Rounds of [seed method, mlp_acts alone, whole stage], medians of each."""
    out = os.path.join(root, "a")
    lm = make_run(out, n_ctx)
    tokens = store.read_tokens(out, "train")[1]
    positions = acts.sample_positions(0, np.arange(n_ctx), T, P)
    seed, alone, stage, runs = [], [], [], []
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False, object_store_memory=256 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for _ in range(rounds):
            seed.append(seed_method(lm, tokens, positions))
            alone.append(compute_alone(lm, tokens, positions))
            store.delete(store.Layout(out).acts)
            t0 = time.perf_counter()
            manifest = acts.run(bench_cfg(out))
            runs.append((time.perf_counter() - t0, manifest["last_run"]))
            stage.append(manifest["last_run"]["steady_vectors_per_s"])
    finally:
        ray.shutdown()
    wall, run = runs[-1]
    return {"out": out, "manifest": manifest, "seed": statistics.median(seed),
            "alone": statistics.median(alone), "stage": statistics.median(stage),
            "stage_wall": manifest["rows"] / wall, "wall_s": wall,
            "first_shard_s": run["first_shard_s"], "rows": manifest["rows"],
            "all": {"seed": seed, "alone": alone, "stage": stage}}


# --- (b) memory ------------------------------------------------------------------------


def rss_child(out: str) -> None:
    """Run one collection under `out` (already prepared) and print peak RSS as JSON."""
    me, peaks, names, stop = os.getpid(), {}, {}, threading.Event()

    def poll():
        while not stop.is_set():
            for pid, name in descendants(me).items():
                peaks[pid] = max(peaks.get(pid, 0), hwm_kb(pid))
                names[pid] = name
            stop.wait(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False, object_store_memory=256 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        manifest = acts.run(bench_cfg(out))
    finally:
        time.sleep(0.2)
        ray.shutdown()
        stop.set()
        watcher.join()
    workers = [kb for pid, kb in peaks.items() if names[pid].startswith("ray::")]
    actors = [kb for pid, kb in peaks.items() if "MapWorker" in names[pid]]
    print("RSS " + json.dumps({"rows": manifest["rows"], "driver_mb": hwm_kb(me) / 1024,
                               "actor_mb": max(actors, default=0) / 1024,
                               "sum_workers_mb": sum(workers) / 1024,
                               "n_workers": len(workers)}))


def memory(root: str, n_small: int) -> dict:
    res = {}
    for label, n in (("1x", n_small), ("10x", 10 * n_small)):
        out = os.path.join(root, f"rss{label}")
        make_run(out, n)
        proc = subprocess.run([sys.executable, __file__, "--rss-child", out],
                              capture_output=True, text=True, timeout=600)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RSS ")]
        if proc.returncode or not line:
            raise RuntimeError(f"RSS child failed: {proc.stderr[-3000:]}")
        res[label] = json.loads(line[0][4:])
        shutil.rmtree(out, ignore_errors=True)
    return res


# --- (c) disk --------------------------------------------------------------------------


def disk(a: dict, root: str) -> dict:
    shard = store.join(a["manifest"]["dir"], a["manifest"]["files"][0]["name"])
    table = store.read_table(shard)
    res = {}
    for comp in ("none", "zstd"):
        path = os.path.join(root, f"disk-{comp}.parquet")
        t0 = time.perf_counter()
        size = store.write_acts_shard(path, table, comp, 4096)
        res[comp] = {"bytes_per_row": size / table.num_rows,
                     "write_rows_per_s": table.num_rows / (time.perf_counter() - t0)}
    res["raw"] = a["manifest"]["H"] * 2
    res["manifest_bytes_per_row"] = a["manifest"]["bytes"] / a["manifest"]["rows"]
    return res


# --- (d) reader ------------------------------------------------------------------------


def sae_samples_per_s(N=8192, H=512, F=4096, steps=4) -> float:
    """A plain float32 SAE step (paper loss, Adam) at batch N: samples/s."""
    torch.manual_seed(0)
    W_enc = (torch.randn(H, F) / math.sqrt(H)).requires_grad_()
    W_dec = torch.nn.functional.normalize(torch.randn(F, H), dim=1).requires_grad_()
    b_enc, b_dec = torch.zeros(F, requires_grad=True), torch.zeros(H, requires_grad=True)
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=3e-4)
    x = torch.randn(N, H)

    def step():
        f = torch.relu((x - b_dec) @ W_enc + b_enc)                       # (N, F)
        x_hat = f @ W_dec + b_dec                                         # (N, H)
        loss = (x_hat - x).pow(2).mean() + 1e-3 * f.abs().sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return N * steps / (time.perf_counter() - t0)


def reader_rows_per_s(out: str, epochs: int = 4) -> float:
    reader = ActsReader(out, 8192, shuffle_buffer=262_144, epochs=epochs)
    t0, rows = time.perf_counter(), 0
    for x in reader:
        rows += len(x)
    return rows / (time.perf_counter() - t0)


def perfect_distinct(contexts: int, rows_per_ctx: int, batch: int) -> float:
    """E[distinct contexts] in `batch` rows drawn without replacement from all rows."""
    n = contexts * rows_per_ctx
    log_none = sum(math.log((n - batch - i) / (n - i)) for i in range(rows_per_ctx))
    return contexts * (1 - math.exp(log_none))


def mixing(root: str, n_shards: int = 64, shard_ctx: int = 1024, batches: int = 8) -> dict:
    """Distinct contexts per batch of 8192 on the paper's shard geometry (acts H=1)."""
    d = os.path.join(root, "mix")
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        first = s * shard_ctx
        ctx = np.repeat(np.arange(first, first + shard_ctx), P)[rng.permutation(shard_ctx * P)]
        table = store.acts_table(ctx, np.zeros_like(ctx), np.zeros_like(ctx),
                                 np.zeros((len(ctx), 1), np.float16), "float16")
        store.write_acts_shard(os.path.join(d, store.acts_shard_name(first)), table, "zstd",
                               4096)
    reader = ActsReader(d, 8192, shuffle_buffer=262_144, with_meta=True)
    it = iter(reader)
    got = [len(np.unique(next(it)[1]["ctx"])) for _ in range(batches)]
    shutil.rmtree(d, ignore_errors=True)
    return {"reader": statistics.mean(got),
            "perfect_same_data": perfect_distinct(n_shards * shard_ctx, P, 8192),
            "perfect_paper": perfect_distinct(2_000_000, P, 8192)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, default=384, help="contexts for (a), (c), (d)")
    ap.add_argument("--rss-contexts", type=int, default=128, help="1x contexts for (b)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (a)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.rss_child:
        return rss_child(args.rss_child)
    root = tempfile.mkdtemp(prefix="bench-collect-")
    try:
        report(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(root: str, args) -> None:
    print(f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, load avg "
          f"{os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    t0 = time.perf_counter()
    a = throughput(root, args.contexts, args.rounds)
    print(f"(a) {a['rows']} vectors ({args.contexts} ctx x {P}, T={T}, batch {BATCH} ctx)")
    print(f"    seed method (all positions, gather)  {a['seed']:>10,.0f} vectors/s")
    print(f"    mlp_acts(idx, positions) alone       {a['alone']:>10,.0f} vectors/s")
    print(f"    whole stage, steady (after shard 1)  {a['stage']:>10,.0f} vectors/s")
    print(f"    whole stage incl. Ray/actor start    {a['stage_wall']:>10,.0f} vectors/s "
          f"({a['wall_s']:.1f} s, first shard after {a['first_shard_s']:.1f} s)")
    print("    per round: " + "; ".join(f"{k} " + ", ".join(f"{v:,.0f}" for v in vs)
                                     for k, vs in a["all"].items()))
    print(f"    stage / seed = {a['stage'] / a['seed']:.2f} (target >= 2); "
          f"stage / mlp_acts alone = {a['stage'] / a['alone']:.2f} (target >= 0.8); "
          f"mlp_acts alone / seed = {a['alone'] / a['seed']:.2f}")
    c = disk(a, root)
    print(f"(c) bytes/row: none {c['none']['bytes_per_row']:.1f}, zstd "
          f"{c['zstd']['bytes_per_row']:.1f}, raw fp16 {c['raw']} -> ratio none "
          f"{c['none']['bytes_per_row'] / c['raw']:.3f}, zstd "
          f"{c['zstd']['bytes_per_row'] / c['raw']:.3f} (target <= 1.05); write rows/s none "
          f"{c['none']['write_rows_per_s']:,.0f}, zstd {c['zstd']['write_rows_per_s']:,.0f}")
    r, s = reader_rows_per_s(a["out"]), sae_samples_per_s()
    print(f"(d) reader {r:,.0f} rows/s vs SAE step {s:,.0f} samples/s (8192 x 512 -> 4096 "
          f"fp32) = {r / s:.1f}x (target >= 5)")
    t_mix = time.perf_counter()
    m = mixing(root)
    t_mix = time.perf_counter() - t_mix
    print(f"    distinct contexts per 8192 batch (64 shards x 1024 ctx x 200): reader "
          f"{m['reader']:.0f}, perfect shuffle of the same data {m['perfect_same_data']:.0f} "
          f"-> {m['reader'] / m['perfect_same_data']:.3f} (target >= 0.9); vs a perfect "
          f"shuffle of the paper's 2 M contexts ({m['perfect_paper']:.0f}): "
          f"{m['reader'] / m['perfect_paper']:.3f}")
    t_rss = time.perf_counter()
    b = memory(root, args.rss_contexts)
    for k in ("driver_mb", "actor_mb", "sum_workers_mb"):
        print(f"(b) peak RSS {k[:-3]:<12} 1x {b['1x'][k]:7.0f} MB, 10x {b['10x'][k]:7.0f} MB "
              f"-> {b['10x'][k] / b['1x'][k]:.2f} (target <= 1.2)")
    print(f"    rows 1x {b['1x']['rows']}, 10x {b['10x']['rows']}; Ray workers seen "
          f"{b['1x']['n_workers']} / {b['10x']['n_workers']}")
    print(f"bench: {time.perf_counter() - t0:.0f} s (mixing {t_mix:.0f} s, RSS runs "
          f"{time.perf_counter() - t_rss:.0f} s)")


if __name__ == "__main__":
    main()
