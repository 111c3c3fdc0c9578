"""Stage 5: one SAE over the activation shards -> feature tables and a static feature browser.

    python -m ray_jobs.analyze --preset demo --out runs/demo
    python -m ray_jobs.analyze --preset demo --out runs/demo --trial runs/demo/sae_single/sae
    ray job submit --working-dir . --entrypoint-num-cpus 1 -- \
        python -m ray_jobs.analyze --preset paper --out s3://BUCKET/mono/paper \
        --max_rows 100000000

--trial: a trial name of <out>/sweep/<name>/trials.json or an SAE export dir; by default the
sweep's best loss_recovered_mean (vs mean ablation) among trials with L0 <= --target_l0
(else the best overall, with a note), or <out>/sae_single/sae without a sweep. Prints the
index.html to open. No SAE to analyse, missing or corrupt activation shards, or an SAE,
shards and LM of different widths are reported before Ray starts, as one line (exit status
2; --traceback shows the stack).
"""

import ray

from mono import cli, features

PROG = "python -m ray_jobs.analyze"
SECTIONS = ("analysis",)


def main(argv: list[str] | None = None, init=None) -> dict:
    cfg = cli.parse(argv, PROG, __doc__, SECTIONS, init=init, check=features.check)
    summary = features.run(cfg)
    classes = ", ".join(f"{n} {c}" for c, n in summary["classes"].items())
    print(f"analysis: {summary['trial']} ({summary['chosen']}): {summary['n_features']} "
          f"features over {summary['rows']} rows, L0 {summary['l0']:.2f}; {classes}; "
          f"{summary['seconds']['total']:.1f} s")
    print(summary["index"])
    return summary


if __name__ == "__main__":
    cli.main(main, PROG, init=ray.init)
