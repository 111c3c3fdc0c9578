"""Stage 5: one SAE over the activation shards -> feature tables and a static feature browser.

    python -m ray_jobs.analyze --preset demo --out runs/demo
    python -m ray_jobs.analyze --preset demo --out runs/demo --trial runs/demo/sae_single/sae
    ray job submit --working-dir . --entrypoint-num-cpus 1 -- \
        python -m ray_jobs.analyze --preset paper --out s3://BUCKET/mono/paper \
        --max_rows 100000000

--trial: a trial name of <out>/sweep/<name>/trials.json or an SAE export dir; by default the
sweep's best loss_recovered among trials with L0 <= --target_l0 (else the best overall,
with a note), or <out>/sae_single/sae without a sweep. Prints the index.html to open.
"""

import logging

import ray

from mono import cli, features

SECTIONS = ("analysis",)


def main(argv: list[str] | None = None, init=None) -> dict:
    cfg = cli.parse(argv, "python -m ray_jobs.analyze", __doc__, SECTIONS, init=init)
    summary = features.run(cfg)
    classes = ", ".join(f"{n} {c}" for c, n in summary["classes"].items())
    print(f"analysis: {summary['trial']} ({summary['chosen']}): {summary['n_features']} "
          f"features over {summary['rows']} rows, L0 {summary['l0']:.2f}; {classes}; "
          f"{summary['seconds']['total']:.1f} s")
    print(summary["index"])
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(init=ray.init)
