"""Stage 4: sweep SAEs over an l1_coeff x lr grid with Ray Tune (one trial per grid point).

    python -m ray_jobs.sweep_sae --preset demo --out runs/demo
    python -m ray_jobs.sweep_sae --preset demo --out runs/demo --l1_coeff 1e-3 3e-3 1e-2 \
        --lr 3e-4 1e-3 --sae.n_steps 2000 --max_concurrent_trials 2
    python -m ray_jobs.sweep_sae --preset demo --out runs/demo --report-only
    ray job submit --working-dir . --entrypoint-num-cpus 1 -- \
        python -m ray_jobs.sweep_sae --preset paper --out s3://BUCKET/mono/paper \
        --gpus_per_trial 0.25 --wandb

Bare --l1_coeff / --lr set the grid; --sae.<field> sets every trial's base (--sae.lr is
then overridden by the grid). Writes <out>/sweep/<name>/ (or --storage_path/<name>): one
trial dir per grid point with its sae/ export, trials.json, report/index.html. Running the
same command again resumes an interrupted sweep (finished trials are kept).
--report-only rebuilds trials.json and the report from the trial dirs, without Ray.
"""

import argparse
import logging

import ray

from mono import cli, sweep

SECTIONS = ("sweep", "sae")


def main(argv: list[str] | None = None, init=None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--report-only", action="store_true")
    known, rest = pre.parse_known_args(argv)
    cfg = cli.parse(rest, "python -m ray_jobs.sweep_sae", __doc__, SECTIONS, init=init)
    try:
        summary = sweep.report(cfg) if known.report_only else sweep.run(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad input: checked before any trial
        raise SystemExit(f"sweep_sae: error: {err}") from err
    print(f"{'trial':<44}{'status':<12}{'L0':>8}{'loss rec.':>11}{'EV':>8}"
          f"{'dead (train/eval)':>19}")
    for t in summary["trials"]:
        m = t.get("metrics") or t["last_report"]
        print(f"{t['name']:<44}{t['status']:<12}{m.get('l0', float('nan')):>8.2f}"
              f"{m.get('loss_recovered', float('nan')):>11.3f}"
              f"{m.get('explained_variance', float('nan')):>8.3f}"
              f"{m.get('dead_train', -1):>12}/{m.get('dead', -1):<6}")
    print(f"trials: {summary['trials_json']}\nsweep report: {summary['report']}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(init=ray.init)
