"""Stage 1: tokenize a corpus with GPT-2 BPE into Parquet token shards (Ray Data).

    python -m ray_jobs.tokenize_corpus --preset demo --out runs/demo
    python -m ray_jobs.tokenize_corpus --preset tiny --out runs/tiny --corpus 'notes/*.txt'
    ray job submit --working-dir . -- python -m ray_jobs.tokenize_corpus --preset paper \
        --out s3://BUCKET/mono/paper --corpus hf:Skylion007/openwebtext
"""

import ray

from mono import cli, tokens

SECTIONS = ("tokens",)


def main(argv: list[str] | None = None):
    cfg = cli.parse(argv, "python -m ray_jobs.tokenize_corpus", __doc__, SECTIONS)
    manifest = tokens.run(cfg)
    print(f"token shards: {manifest['rows']} (train, val contexts of {manifest['ctx_len']} "
          f"tokens) in {manifest['dir']}")
    return manifest


if __name__ == "__main__":
    ray.init()
    main()
