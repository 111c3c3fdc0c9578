"""Feature splitting: one sweep trial per dictionary size -> features matched across sizes,
families, a map of every feature, and their pages.

    python -m ray_jobs.sweep_sae --preset demo --out runs/demo --n_features 512 1024 2048 \
        --l1_coeff 5e-3
    python -m ray_jobs.splitting --preset demo --out runs/demo
    python -m ray_jobs.splitting --preset demo --out runs/demo --trials NAME_512 NAME_2048
    ray job submit --working-dir . -- python -m ray_jobs.splitting --preset paper \
        --out s3://BUCKET/mono/paper

--trials: trial names of <out>/sweep/<name>/trials.json, one per size; by default every
finished size at the l1_coeff and lr of the sweep's best trial (as analyze picks it).
Trials without an analysis are analysed first (--analyze false skips that; their features
then have no pages to link to). Writes <out>/splitting/ (matches.parquet, families.json,
summary.json, html/) and adds each feature's parent and children to its feature page.
Prints the families index to open.
"""

import ray

from mono import cli, splitting

PROG = "python -m ray_jobs.splitting"
SECTIONS = ("splitting", "analysis", "sweep")


def main(argv: list[str] | None = None, init=None) -> dict:
    cfg = cli.parse(argv, PROG, __doc__, SECTIONS, init=init, check=splitting.check)
    summary = splitting.run(cfg)
    sizes = ", ".join(f"{s['n_features']}: {s['matched_fraction']:.0%} matched"
                      for s in summary["sizes"] if "matched_fraction" in s)
    print(f"splitting: {len(summary['trials'])} sizes ({sizes}), {summary['families']} "
          f"families; {summary['seconds']['total']:.1f} s")
    print(summary["index"])
    return summary


if __name__ == "__main__":
    cli.main(main, PROG, init=ray.init)
