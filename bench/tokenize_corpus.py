"""Benchmark stage 1: tokens/s of `tokens.run` (Ray Data) vs a single-process tiktoken loop.

    .venv/bin/python bench/tokenize_corpus.py [--repeats 3] [--corpus PATH]

(Not bench/tokenize.py: run as a script, that name shadows the stdlib `tokenize` module, which
`logging` imports, and the script fails before it starts.)

Both sides tokenize the embedded offline corpus (the demo preset's, extracted once and cached
before timing), or --corpus (then the stage's time includes reading it, the baseline's not).
The baseline is `enc.encode_ordinary_batch` (tiktoken's own thread pool) and a
plain `encode_ordinary` loop; the stage is the real code path: split, Ray Data tokenize tasks
in order, windows of T, Parquet shards written and published, manifest. The stage runs once
untimed first so Ray's worker start-up is not counted; the best of --repeats is reported.
"""

import argparse
import shutil
import tempfile
import time

import ray

from mono import corpus, tokens
from mono.config import TokensConfig, preset, with_overrides


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", default="", help="a corpus spec; '' = the embedded one")
    args = parser.parse_args()

    start = time.perf_counter()
    docs = list(corpus.iter_documents(TokensConfig(corpus=args.corpus)))
    read_s = time.perf_counter() - start
    enc = tokens.gpt2()
    n_tokens = sum(map(len, enc.encode_ordinary_batch(docs))) + len(docs)  # + one EOT each
    print(f"corpus {corpus.describe_corpus(args.corpus)}: {len(docs)} documents, "
          f"{sum(map(len, docs)):,} chars, {n_tokens:,} tokens incl. EOT (read in {read_s:.1f} s"
          f", not timed below)")

    batch_s = best_of(args.repeats, lambda: enc.encode_ordinary_batch(docs))
    loop_s = best_of(args.repeats, lambda: [enc.encode_ordinary(d) for d in docs])
    print(f"single process, encode_ordinary_batch (8 threads): {n_tokens / batch_s:12,.0f} "
          f"tokens/s ({batch_s:.2f} s)")
    print(f"single process, encode_ordinary loop:              {n_tokens / loop_s:12,.0f} "
          f"tokens/s ({loop_s:.2f} s)")

    tmp = tempfile.mkdtemp(prefix="bench-tokenize-")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for docs_per_block in (2048, 128):
            cfg = with_overrides(preset("demo"), out=f"{tmp}/out",
                                 tokens={"docs_per_block": docs_per_block, "corpus": args.corpus})
            tokens.run(cfg)  # warm-up: Ray workers start, import mono, build the BPE
            run_s = best_of(args.repeats, lambda: tokens.run(cfg))
            n_blocks = -(-len(docs) // docs_per_block)
            print(f"tokens.run, Ray Data, 2 CPUs, {n_blocks:2d} block(s) of <= {docs_per_block}"
                  f" docs: {n_tokens / run_s:12,.0f} tokens/s ({run_s:.2f} s)  "
                  f"ratio to encode_ordinary_batch: {batch_s / run_s:.2f}x")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
