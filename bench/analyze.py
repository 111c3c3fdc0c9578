"""Benchmark stage 5 (mono.features.run): rows/s of the two scan passes and peak RSS at 1x
and 10x the rows, each size in its own subprocess with its own Ray (2 CPUs).

    .venv/bin/python bench/analyze.py                     # ~1.5-2 min on 2 cores
    .venv/bin/python bench/analyze.py --rows 20000        # quicker

Demo-shaped data: H 512, F 2048 features, T 128, synthetic fp16 activation shards
(|N(0,1)| - 0.5, like post-GELU values) written with the store's shard writer, a random SAE
whose encoder biases give L0 ~ 30, random token shards and a random demo-shaped LM (for the
windows and logit effects). The 10x run lists every 1x shard 10 times under other names
(hard links: same bytes, no extra disk), so the two runs differ only in rows scanned.

(a) in one process, one thread, alternated over 3 rounds on the same 1x rows: `scan` (pass 1:
    count, sum, top-k; pass 2: value intervals, histograms; both reading Parquet and
    decoding fp16) vs the bare SAE encode of those rows already in memory as float32 (the
    floor of each pass). The ratio is the scan's overhead, robust to a busy machine.
(b) the whole stage through Ray at 1x and 10x rows: rows/s of each pass, wall time, and peak
    RSS (/proc VmHWM, polled every 50 ms) of the driver and of the largest Ray worker at 10x
    vs 1x (target <= 1.2: the per-feature state is bounded, the rows are streamed). Pass 1
    includes the Ray workers' start-up (importing torch and mono).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _rss import descendants, hwm_kb  # bench/ is on sys.path when run as a script

from mono import features, reader, scan, store  # noqa: E402
from mono.config import PRESETS, with_overrides  # noqa: E402
from mono.lm import Lm  # noqa: E402
from mono.sae import SparseAutoencoder  # noqa: E402

H, F, T, SHARD_ROWS, RG = 512, 2048, 128, 16_384, 4096


def make_run(out: str, rows: int, seed: int = 0) -> None:
    """Tokens, LM, fp16 activation shards (+ manifest x1 and x10) and an SAE under out."""
    rng = np.random.default_rng(seed)
    n_ctx = max(64, rows // 64)
    tokens = rng.integers(0, 50257, (n_ctx, T))
    tdir = store.Layout(out).tokens("train")
    store.write_table_atomic(store.join(tdir, "part-00000.parquet"),
                             store.token_table(np.arange(n_ctx), tokens))
    store.write_json(store.Layout(out).tokens_manifest, {
        "ctx_len": T, "rows": {"train": n_ctx, "val": 0},
        "splits": {"train": {"rows": n_ctx, "files": [
            {"name": "part-00000.parquet", "first": 0, "rows": n_ctx}]},
            "val": {"rows": 0, "files": []}}})
    cfg = with_overrides(PRESETS["demo"], out=out)
    torch.manual_seed(seed)
    store.save_lm(store.Layout(out).lm, Lm(cfg.lm).eval(), cfg)
    files = []
    for first in range(0, rows, SHARD_ROWS):
        n = min(SHARD_ROWS, rows - first)
        x = (np.abs(rng.standard_normal((n, H), dtype=np.float32)) - 0.5).astype(np.float16)
        ctx = rng.integers(0, n_ctx, n)
        pos = rng.integers(0, T, n)
        table = store.acts_table(ctx, pos, tokens[ctx, pos], x, "float16")
        name = store.acts_shard_name(first)
        store.write_acts_shard(store.join(store.Layout(out).acts, name), table, "zstd", RG)
        files.append({"name": name, "rows": n})
    for times in (1, 10):
        listed = []
        for k in range(times):
            for f in files:
                name = f["name"] if k == 0 else f"copy{k}-{f['name']}"
                path = os.path.join(store.Layout(out).acts, name)
                if k and not os.path.exists(path):
                    os.link(os.path.join(store.Layout(out).acts, f["name"]), path)
                listed.append({"name": name, "rows": f["rows"]})
        store.write_json(os.path.join(out, f"manifest-x{times}.json"),
                         {"format": "mono.acts/1", "H": H, "dtype": "float16",
                          "row_group_rows": RG, "rows": sum(f["rows"] for f in listed),
                          "files": listed})
    sae = SparseAutoencoder(H, F, 1e-3, generator=torch.Generator().manual_seed(seed))
    sample = torch.from_numpy(np.abs(rng.standard_normal((4096, H), dtype=np.float32)) - 0.5)
    with torch.no_grad():
        pre = sample @ sae.W_enc                                          # (4096, F)
        sae.b_enc.copy_(-pre.quantile(1 - 30 / F, dim=0))                 # L0 ~ 30
    sae_dir = os.path.join(out, "sae_single", "sae")
    os.makedirs(sae_dir, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sae.state_dict().items()},
                                os.path.join(sae_dir, "sae.safetensors"))
    store.write_json(os.path.join(sae_dir, "cfg.json"), {"format": "mono.sae/1", "d_in": H,
                                                         "n_features": F, "l1_coeff": 1e-3})


def side_by_side(out: str, rounds: int = 3, batch: int = 4096) -> dict:
    """Median seconds over `rounds` of: bare encode, scan pass 1, scan pass 2 (1 thread)."""
    torch.set_num_threads(1)
    sae, _ = features.load_sae(os.path.join(out, "sae_single", "sae"))
    state = {k: v.detach().numpy() for k, v in sae.state_dict().items()}
    listed = store.read_json(os.path.join(out, "manifest-x1.json"))["files"]
    shards = reader.shard_list([os.path.join(store.Layout(out).acts, f["name"]) for f in listed])
    pieces = scan.plan_pieces(shards, 0)
    x = torch.cat([reader.to_float32(np.array(store.table_acts(store.read_table(f))[3]), "float16")
                   for f in shards["files"]])                                # (rows, H)
    common = {"batch_rows": batch, "seed": 0}
    times = {"encode": [], "pass1": [], "pass2": []}
    max_act = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(x), batch):
                sae.encode(x[s:s + batch])
        times["encode"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        top = scan.scan(pieces, shards["files"], "float16", state, common | {
            "kind": "top", "k": 10})
        times["pass1"].append(time.perf_counter() - t0)
        max_act = top.max_act.numpy()
        t0 = time.perf_counter()
        scan.scan(pieces, shards["files"], "float16", state, common | {
            "kind": "intervals", "max_act": max_act, "n_intervals": 12, "per_interval": 5,
            "n_bins": 32})
        times["pass2"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()} | {"rows": len(x)}


# --- one size in a subprocess -------------------------------------------------------------


def child(out: str, times: int) -> None:
    """Run the stage on the x`times` manifest; print one JSON line of results."""
    import ray

    os.replace(os.path.join(out, f"manifest-x{times}.json"), store.Layout(out).acts_manifest)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 1024**2)
    peaks: dict[int, tuple[str, int]] = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for pid, name in descendants(os.getpid()).items():
                if "ray::" in name:          # Ray workers (scan tasks), not raylet/gcs
                    peaks[pid] = (name, max(peaks.get(pid, ("", 0))[1], hwm_kb(pid)))
            stop.wait(0.05)

    threading.Thread(target=poll, daemon=True).start()
    cfg = with_overrides(PRESETS["demo"], out=out, analysis={"n_tasks": 4})
    t0 = time.perf_counter()
    summary = features.run(cfg)
    wall = time.perf_counter() - t0
    stop.set()
    workers = sorted((kb for _, kb in peaks.values()), reverse=True)
    print(json.dumps({"rows": summary["rows"], "l0": summary["l0"], "wall": wall,
                      "seconds": summary["seconds"], "driver_kb": hwm_kb(os.getpid()),
                      "worker_kb": workers[:1] or [0], "n_workers": len(workers)}))
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=49_152, help="rows at 1x (10x is 10 times)")
    ap.add_argument("--child", nargs=2, metavar=("OUT", "TIMES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))
    with tempfile.TemporaryDirectory(prefix="bench-analyze-") as out:
        t0 = time.perf_counter()
        make_run(out, args.rows)
        print(f"setup: {args.rows} rows x{H} fp16, F={F}, in {time.perf_counter() - t0:.1f} s")
        side = side_by_side(out)
        results = {}
        for times in (1, 10):
            proc = subprocess.run([sys.executable, __file__, "--child", out, str(times)],
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode:
                sys.exit(f"x{times} failed:\n{proc.stderr[-3000:]}")
            results[times] = json.loads(proc.stdout.strip().splitlines()[-1])
    n = side["rows"]
    print(f"(a) one thread, {n:,} rows, medians of 3 alternated rounds:")
    for key, label in (("encode", "bare SAE encode (fp32 rows in memory)"),
                       ("pass1", "scan pass 1 (Parquet, fp16, count/sum/top-k)"),
                       ("pass2", "scan pass 2 (Parquet, fp16, intervals/histogram)")):
        print(f"    {label:<50} {n / side[key]:>9,.0f} rows/s  "
              f"{side['encode'] / side[key]:.2f} of bare encode")
    print("(b) the stage through Ray (2 CPUs, 4 tasks):")
    print(f"    {'size':>5} {'rows':>9} {'L0':>5} {'pass1 rows/s':>13} {'pass2 rows/s':>13} "
          f"{'wall s':>7} {'driver MB':>10} {'worker MB':>10}")
    for times, r in results.items():
        sec = r["seconds"]
        print(f"    {'x' + str(times):>5} {r['rows']:>9,} {r['l0']:>5.1f} "
              f"{r['rows'] / sec['pass_top']:>13,.0f} {r['rows'] / sec['pass_intervals']:>13,.0f} "
              f"{r['wall']:>7.1f} {r['driver_kb'] / 1024:>10.0f} "
              f"{r['worker_kb'][0] / 1024:>10.0f}")
    one, ten = results[1], results[10]
    print(f"    peak RSS x10 / x1: driver {ten['driver_kb'] / one['driver_kb']:.2f}, largest "
          f"worker {ten['worker_kb'][0] / max(one['worker_kb'][0], 1):.2f} (target <= 1.2)")
    print(f"    tables + pages: x1 {one['seconds']['tables'] + one['seconds']['pages']:.1f} s, "
          f"x10 {ten['seconds']['tables'] + ten['seconds']['pages']:.1f} s")


if __name__ == "__main__":
    main()
