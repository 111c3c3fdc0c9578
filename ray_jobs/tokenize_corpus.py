"""Stage 1: tokenize a corpus with GPT-2 BPE into Parquet token shards (Ray Data).

    python -m ray_jobs.tokenize_corpus --preset demo --out runs/demo
    python -m ray_jobs.tokenize_corpus --preset tiny --out runs/tiny --corpus 'notes/*.txt'
    ray job submit --working-dir . --entrypoint-num-cpus 1 -- \
        python -m ray_jobs.tokenize_corpus --preset paper --out s3://BUCKET/mono/paper \
        --corpus hf:Skylion007/openwebtext

--corpus: '' (the embedded offline default), a text file (blank lines separate documents), a
glob, a directory, a .parquet/.jsonl file with --text_column, or hf:NAME[:CONFIG].
A missing or unreadable corpus (or one without --text_column) and an --out that is a file
or not writable are reported before Ray starts, as one line `... error: ...` (exit status 2;
--traceback shows the stack); an hf: dataset is looked up once Ray runs.
"""

import ray

from mono import cli, tokens

PROG = "python -m ray_jobs.tokenize_corpus"
SECTIONS = ("tokens",)


def main(argv: list[str] | None = None, init=None):
    cfg = cli.parse(argv, PROG, __doc__, SECTIONS, init=init, check=tokens.check)
    manifest = tokens.run(cfg)
    rows, docs = manifest["rows"], manifest["docs"]
    print(f"tokens: {rows['train']} train / {rows['val']} val contexts of {manifest['ctx_len']} "
          f"tokens from {docs['train']} / {docs['val']} documents of {manifest['source']} "
          f"-> {manifest['dir']}")
    return manifest


if __name__ == "__main__":
    cli.main(main, PROG, init=ray.init)
