"""Benchmark feature-splitting matching (mono.splitting.decoder_matches): time and peak RSS
of matching a dictionary of S features against one of L at H 512, as S x L grows to the
paper's 16,384 x 65,536 (runs A/2 -> A/4), each size in its own subprocess.

    .venv/bin/python bench/splitting.py                   # ~1 min on 2 idle cores, 2-4 loaded
    .venv/bin/python bench/splitting.py --sizes 1024:4096 4096:16384

Synthetic decoders: random unit rows (float32), drawn in the child process. Per size the
child reports: the matching's wall time (best of --rounds), GFLOP/s of its 2*S*L*H products,
peak RSS (VmHWM) before matching (the decoders) and after it, and the increment: what the
matching itself held (target: bounded by the blocks, ~block^2 x 12 bytes + O(S + L) state,
flat as S x L grows, while the full S x L cosine matrix is 4 GB at 16 k x 65 k).

Side by side in the same child, at sizes where it fits (S x L x 4 bytes <= --dense_max_mb):
the dense computation (the whole S x L product, then top-k and max), its time and its RSS
increment; the ratio is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _rss import hwm_kb  # bench/ is on sys.path when run as a script

H = 512


def child(S: int, L: int, block: int, rounds: int, dense_max_mb: int, threads: int) -> dict:
    import os

    from mono.splitting import decoder_matches, unit_rows

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    small = unit_rows(torch.randn(S, H, generator=gen))
    large = unit_rows(torch.randn(L, H, generator=gen))
    base = hwm_kb(os.getpid())
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        decoder_matches(small, large, 3, block)
        times.append(time.perf_counter() - t0)
    peak = hwm_kb(os.getpid())
    out = {"S": S, "L": L, "block": block, "seconds": min(times),
           "gflops": 2 * S * L * H / min(times) / 1e9, "rss_inputs_mb": base / 1024,
           "rss_peak_mb": peak / 1024, "rss_matching_mb": (peak - base) / 1024,
           "dense_matrix_mb": S * L * 4 / 2**20}
    if S * L * 4 / 2**20 <= dense_max_mb:
        t0 = time.perf_counter()
        sims = large @ small.T                                               # (L, S)
        sims.topk(3, dim=1)
        sims.max(dim=0)
        out["dense_seconds"] = time.perf_counter() - t0
        out["dense_rss_increment_mb"] = (hwm_kb(os.getpid()) - peak) / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="*",
                    default=["1024:4096", "4096:16384", "8192:32768", "16384:65536"])
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense_max_mb", type=int, default=1100)
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.block, args.rounds, args.dense_max_mb,
                               args.threads)))
        return
    rows = []
    for size in args.sizes:
        S, L = (int(v) for v in size.split(":"))
        rounds = args.rounds if S * L <= 2**28 else 1
        cmd = [sys.executable, __file__, "--child", str(S), str(L), "--block", str(args.block),
               "--rounds", str(rounds), "--dense_max_mb", str(args.dense_max_mb),
               "--threads", str(args.threads)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                        text=True).stdout.strip().splitlines()[-1])
        rows.append(res)
        dense = (f"; dense {res['dense_seconds']:.2f} s (blocked/dense time "
                 f"{res['seconds'] / res['dense_seconds']:.2f}), "
                 f"+{res['dense_rss_increment_mb']:.0f} MB RSS" if "dense_seconds" in res else
                 f"; dense matrix would be {res['dense_matrix_mb']:,.0f} MB")
        print(f"S {S:>6} x L {L:>6} (H {H}, block {args.block}): {res['seconds']:7.2f} s, "
              f"{res['gflops']:5.1f} GFLOP/s, peak RSS {res['rss_peak_mb']:6.0f} MB "
              f"(decoders {res['rss_inputs_mb']:.0f}, matching +{res['rss_matching_mb']:.0f})"
              f"{dense}", flush=True)
    first, last = rows[0], rows[-1]
    work = last["S"] * last["L"] / (first["S"] * first["L"])
    print(f"from {first['S']}x{first['L']} to {last['S']}x{last['L']}: {work:.0f}x the pairs, "
          f"{last['seconds'] / first['seconds']:.0f}x the time, matching RSS "
          f"+{first['rss_matching_mb']:.0f} -> +{last['rss_matching_mb']:.0f} MB")


if __name__ == "__main__":
    main()
