"""Stage 3: run the LM over the token shards and write its MLP activations (Ray Data actors).

    python -m ray_jobs.collect_acts --preset demo --out runs/demo
    python -m ray_jobs.collect_acts --preset tiny --out runs/tiny --tokens_per_context 8
    ray job submit --working-dir . --entrypoint-num-cpus 1 -- \
        python -m ray_jobs.collect_acts --preset paper --out s3://BUCKET/mono/paper \
        --max_actors 4   # cluster.yaml caps GPU workers at 4

Rerunning into the same --out resumes: finished shards are kept, the rest are written.
Missing or corrupt token shards, a missing LM or one of another LmConfig (e.g. its d_mlp),
and --tokens_per_context / --n_contexts the shards cannot give are reported before Ray
starts, as one line (exit status 2; --traceback shows the stack).
"""

import ray

from mono import acts, cli

PROG = "python -m ray_jobs.collect_acts"
SECTIONS = ("acts",)


def main(argv: list[str] | None = None, init=None):
    cfg = cli.parse(argv, PROG, __doc__, SECTIONS, init=init, check=acts.check)
    manifest = acts.run(cfg)
    print(f"activation shards: {manifest['rows']} rows ({manifest['n_contexts']} contexts x "
          f"{manifest['tokens_per_context']}, H={manifest['H']} {manifest['dtype']}), "
          f"{len(manifest['files'])} files, {manifest['bytes'] / 1e6:.1f} MB in "
          f"{manifest['dir']}")
    return manifest


if __name__ == "__main__":
    cli.main(main, PROG, init=ray.init)
