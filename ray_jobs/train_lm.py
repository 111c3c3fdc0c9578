"""Stage 2: train the one-layer transformer on the token shards (Ray Train, DDP).

    python -m ray_jobs.train_lm --preset demo --out runs/demo
    python -m ray_jobs.train_lm --preset tiny --out runs/tiny --max_iters 60
    ray job submit --working-dir . --entrypoint-num-cpus 1 -- \
        python -m ray_jobs.train_lm --preset paper --out s3://BUCKET/mono/paper \
        --num_workers 4 --use_gpu   # cluster.yaml caps GPU workers at 4

Rerunning the same command resumes from the last checkpoint in <out>/lm. Missing token
shards, contexts longer than --block_size, or an <out>/lm checkpoint of another LmConfig
(e.g. its d_mlp) are reported before Ray starts, as one line (exit status 2; --traceback
shows the stack).
"""

import ray

from mono import cli, train_lm

PROG = "python -m ray_jobs.train_lm"
SECTIONS = ("lm", "train_lm")


def main(argv: list[str] | None = None, init=None):
    cfg = cli.parse(argv, PROG, __doc__, SECTIONS, init=init, check=train_lm.check)
    m = train_lm.run(cfg)
    print(f"LM: val loss {m['val_loss']:.4f} nats after {m['step']} steps ({m['tokens']:,} "
          f"tokens) vs unigram baselines on the same val targets: entropy "
          f"{m['unigram_entropy']:.4f} ({m['val_loss'] - m['unigram_entropy']:+.4f}), "
          f"train-unigram cross-entropy {m['unigram_xent']:.4f} "
          f"({m['val_loss'] - m['unigram_xent']:+.4f}); weights in {m['dir']}")
    return m


if __name__ == "__main__":
    cli.main(main, PROG, init=ray.init)
