"""Benchmark: one SAE eval (`EvalSet.evaluate`: L_sae + KL, L_bdec, encode) against a single
spliced-loss pass (`EvalSet.lm_loss` with x_hat: what the eval cost before the KL and L_bdec),
on a run's eval set.

    PYTHONPATH=. .venv/bin/python bench/eval.py --out runs/demo --sae runs/demo/sweep/sweep/T/sae

Needs a run with tokens, lm/ and acts/ (the demo pipeline's first three stages) and an SAE
export. Rounds alternate the cases in one process on one torch thread (a sweep trial's), so
load from other processes hits both alike; the first round also pays the once-per-run
pieces (baselines L_orig / L_zero / L_mean, the KL's reference). Prints seconds per case
and the ratio per round.

Measured 2026-12-01 on the shared 2-core box at load ~9 (noisy), demo preset, 64 eval
contexts x 128 tokens, the demo sweep's l1 2e-3 SAE: eval 7.8-8.0 s vs one spliced pass
3.2-3.4 s (2.35-2.42x) once the reference is cached (first eval 18.9 s, 2.58x); the
baselines 16.4 s once.
"""

import argparse
import dataclasses
import time

import torch

from mono import metrics, sae_files, store, train_sae
from mono.config import PRESETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sae", required=True, help="an SAE export dir (cfg.json + weights)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--eval_contexts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = dataclasses.replace(PRESETS[args.preset], out=args.out)
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae,
                                                           eval_contexts=args.eval_contexts))
    lm = store.load_lm(cfg.out)
    sae, _ = sae_files.load_sae(args.sae)
    mean = train_sae.check_inputs(cfg)["mean"]
    ev = metrics.EvalSet(cfg, lm, torch.device("cpu"), sae.n_features)
    print(f"{ev.n_tokens} eval tokens, {sae.n_features} features, 1 thread")
    for r in range(args.rounds):
        t0 = time.perf_counter()
        if r == 0:
            ev.baselines(mean)
        t1 = time.perf_counter()
        ev.evaluate(sae)
        t2 = time.perf_counter()
        with torch.inference_mode():
            ev.lm_loss(lambda a: sae.decode(sae.encode(a.flatten(0, 1))).view_as(a))
        t3 = time.perf_counter()
        once = f"baselines {t1 - t0:.1f} s, " if r == 0 else ""
        ref = " (with the KL reference)" if r == 0 else ""
        print(f"round {r}: {once}eval {t2 - t1:.1f} s{ref}, one spliced pass {t3 - t2:.1f} s, "
              f"ratio {(t2 - t1) / (t3 - t2):.2f}")


if __name__ == "__main__":
    main()
