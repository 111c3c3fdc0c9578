"""Every stage in order: tokenize -> train_lm -> collect_acts -> sweep_sae -> analyze.

    python -m ray_jobs.pipeline                       # demo preset into runs/demo, offline
    python -m ray_jobs.pipeline --preset tiny --out runs/tiny --corpus notes.txt
    ray job submit --working-dir . --entrypoint-num-cpus 1 -- \
        python -m ray_jobs.pipeline --preset paper --out s3://BUCKET/mono/paper

Takes every stage's flags. A bare --<field> means the first section, in pipeline order
(tokens, lm, train_lm, acts, sae, sweep, analysis), that has it: --lr is the LM's learning
rate; --sae.lr 1e-3 sets the SAE's, --sweep.lr 1e-4 3e-4 and --sweep.l1_coeff 1e-3 3e-3 the
sweep grid (likewise --sae.batch_size, --sae.eval_interval, --acts.dtype, --acts.use_gpu).

Writes <out>/cfg.json first, then each stage's artifacts (see mono/store.py). Each stage
needs the one before it, so the chain stops at the first stage whose module (mono.tokens,
mono.train_lm, mono.acts, mono.sweep, mono.features) is not there yet; a stage that fails
stops the pipeline with its error. Rerunning resumes the stages that support it (train_lm,
collect_acts, sweep_sae).
"""

import importlib
import importlib.util
import logging
import time

import pyarrow.fs as pafs
import ray

# Before ray.init: in a `ray job submit` driver, torch imported after ray.init (as the lazily
# imported stages would) dies with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"
# (seen on Ray 2.60's fake multi-node cluster, tests/test_autoscale.py).
import torch  # noqa: F401

from mono import cli, store

SECTIONS = ("tokens", "lm", "train_lm", "acts", "sae", "sweep", "analysis")
STAGES = (  # (job name, library module with run(cfg))
    ("tokenize", "tokens"),
    ("train_lm", "train_lm"),
    ("collect_acts", "acts"),
    ("sweep_sae", "sweep"),
    ("analyze", "features"),
)


def stage_dir(stage: str, cfg) -> str:
    """The directory a stage writes under (its files are what the summary reports)."""
    layout = store.Layout(cfg.out)
    match stage:
        case "tokenize":
            return store.join(cfg.out, "tokens")
        case "train_lm":
            return layout.lm
        case "collect_acts":
            return layout.acts
        case "sweep_sae" if cfg.sweep.storage_path:
            return store.join(cfg.sweep.storage_path, cfg.sweep.name)
        case "sweep_sae":
            return layout.sweep
        case "analyze":
            return store.join(cfg.out, "analysis")
        case other:
            raise ValueError(f"unknown stage {other!r}")


def files_under(path: str) -> list[tuple[str, int]]:
    """(path, bytes) of every file below `path` (local or URI); [] when it does not exist."""
    fs, p = store.resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    scheme = path.split("://", 1)[0] + "://" if store.is_uri(path) else ""
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    return [(scheme + i.path, i.size) for i in infos if i.type == pafs.FileType.File]


def _stage_run(module: str):
    """mono.<module>.run, or None while that module (or its run) is not written yet."""
    if importlib.util.find_spec(f"mono.{module}") is None:
        return None
    return getattr(importlib.import_module(f"mono.{module}"), "run", None)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"


def main(argv: list[str] | None = None, init=None) -> list[dict]:
    """Run the stages; returns one dict per stage: stage, ran, seconds, dir, files, bytes."""
    cfg = cli.parse(argv, "python -m ray_jobs.pipeline", __doc__, SECTIONS, init=init)
    store.write_json(store.Layout(cfg.out).cfg, cfg.to_dict())
    print(f"pipeline: {cfg.out} (config in {store.Layout(cfg.out).cfg})")
    results, missing, t_all = [], None, time.perf_counter()
    for i, (stage, module) in enumerate(STAGES, 1):
        run = None if missing else _stage_run(module)
        if run is None:
            why = f"needs {missing}" if missing else f"mono.{module}.run not written yet"
            missing = missing or f"mono.{module}.run"
            results.append({"stage": stage, "ran": False, "why": why})
            continue
        print(f"\n=== [{i}/{len(STAGES)}] {stage}: mono.{module}.run ===", flush=True)
        t0 = time.perf_counter()
        out = run(cfg)
        seconds = time.perf_counter() - t0
        if isinstance(out, dict) and "report" in out:  # the sweep's HTML report
            print(f"sweep report: {out['report']}")
        files = files_under(stage_dir(stage, cfg))
        results.append({"stage": stage, "ran": True, "seconds": seconds,
                        "dir": stage_dir(stage, cfg), "files": len(files),
                        "bytes": sum(size for _, size in files)})
        print(f"=== {stage} done in {seconds:.1f} s ===", flush=True)
    _print_summary(results, cfg, time.perf_counter() - t_all)
    return results


def _print_summary(results: list[dict], cfg, total_s: float) -> None:
    print(f"\n=== summary: {cfg.out} ===")
    for r in results:
        if r["ran"]:
            print(f"{r['stage']:<13}{r['seconds']:>8.1f} s  {r['dir']}  ({r['files']} files, "
                  f"{_size(r['bytes'])})")
        else:
            print(f"{r['stage']:<13}{'-':>8}    not run: {r['why']}")
    pages = sorted(p for p, _ in files_under(stage_dir("analyze", cfg))
                   if p.endswith("/html/index.html"))
    for page in pages:
        print(f"feature browser: {page}")
    print(f"total {total_s:.1f} s")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(init=ray.init)
