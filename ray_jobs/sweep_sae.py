"""Stage 4: sweep SAEs over an l1_coeff x lr grid with Ray Tune (--pack K SAEs per trial).

    python -m ray_jobs.sweep_sae --preset demo --out runs/demo
    python -m ray_jobs.sweep_sae --preset demo --out runs/demo --l1_coeff 1e-3 3e-3 1e-2 \
        --lr 3e-4 1e-3 --sae.n_steps 2000 --max_concurrent_trials 2
    python -m ray_jobs.sweep_sae --preset demo --out runs/demo --report-only
    ray job submit --working-dir . --entrypoint-num-cpus 1 -- \
        python -m ray_jobs.sweep_sae --preset paper --out s3://BUCKET/mono/paper \
        --gpus_per_trial 0.25 --wandb

Bare --l1_coeff / --lr set the grid; --sae.<field> sets every trial's base (--sae.lr is
then overridden by the grid). Writes <out>/sweep/<name>/ (or --storage_path/<name>): one
trial dir per pack of grid points (--pack 1: per grid point) with the sae/ exports,
trials.json (one row per SAE), report/index.html. Running the
same command again resumes an interrupted sweep (finished trials are kept).
--report-only rebuilds trials.json and the report from the trial dirs, without Ray.
Missing or mismatched inputs (no activation manifest, a corrupt shard, shards of another
LM, an experiment started with other settings, unwritable storage) are reported before
Ray starts, as one line `python -m ray_jobs.sweep_sae: error: ...` (exit status 2).
"""

import argparse

import ray

from mono import cli, sweep

PROG = "python -m ray_jobs.sweep_sae"
SECTIONS = ("sweep", "sae")


def main(argv: list[str] | None = None, init=None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--report-only", action="store_true")
    known, rest = pre.parse_known_args(argv)
    # --report-only reads the trial dirs only: no input check, no Ray
    cfg = cli.parse(rest, PROG, __doc__, SECTIONS, init=None if known.report_only else init,
                    check=None if known.report_only else sweep.check)
    summary = sweep.report(cfg) if known.report_only else sweep.run(cfg)
    # headline: loss recovered against mean ablation; then the paper's (vs zero ablation)
    print(f"{'trial':<44}{'status':<12}{'L0':>7}{'rec/mean':>10}{'rec/zero':>10}"
          f"{'CE+ nats':>10}{'KL':>8}{'EV':>7}{'dead/ultralow (train)':>23}")
    nan = float("nan")
    for t in summary["trials"]:
        m = t.get("metrics") or t["last_report"]
        print(f"{t['name']:<44}{t['status']:<12}{m.get('l0', nan):>7.2f}"
              f"{m.get('loss_recovered_mean', nan):>10.3f}{m.get('loss_recovered', nan):>10.3f}"
              f"{m.get('ce_increase', nan):>10.4f}{m.get('kl', nan):>8.4f}"
              f"{m.get('explained_variance', nan):>7.3f}"
              f"{m.get('dead', -1):>15}/{m.get('ultralow', -1):<7}")
    print(f"trials: {summary['trials_json']}\nsweep report: {summary['report']}")
    return summary


if __name__ == "__main__":
    cli.main(main, PROG, init=ray.init)
