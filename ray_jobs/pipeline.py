"""Every stage in order: tokenize -> train_lm -> collect_acts -> sweep_sae -> analyze ->
splitting (when the sweep has >= 2 dictionary sizes, --sweep.n_features).

    python -m ray_jobs.pipeline                       # demo preset into runs/demo, offline
    python -m ray_jobs.pipeline --preset tiny --out runs/tiny --corpus notes.txt
    ray job submit --working-dir . --entrypoint-num-cpus 1 -- \
        python -m ray_jobs.pipeline --preset paper --out s3://BUCKET/mono/paper

Takes every stage's flags. A bare --<field> means the first section, in pipeline order
(tokens, lm, train_lm, acts, sae, sweep, analysis, splitting), that has it: --lr is the LM's
learning rate; --sae.lr 1e-3 sets the SAE's, --sweep.lr 1e-4 3e-4 and --sweep.l1_coeff 1e-3
3e-3 the sweep grid, --sweep.n_features 512 1024 2048 its dictionary sizes (likewise
--sae.batch_size, --sae.eval_interval, --acts.dtype, --acts.use_gpu).

Writes <out>/cfg.json first, then each stage's artifacts (see mono/store.py). Each stage
needs the one before it, so the chain stops at the first stage whose module (mono.tokens,
mono.train_lm, mono.acts, mono.sweep, mono.features, mono.splitting) is not there yet; a
stage that fails stops the pipeline with its error. Rerunning resumes the stages that
support it (train_lm, collect_acts, sweep_sae).

Errors: --out and the first stage's inputs (the corpus) are checked before Ray starts; each
later stage's inputs exist only once the stage before it ran, so its check
(mono.<module>.check) runs when the chain reaches it. A bad input stops the pipeline with one
line naming the stage, `python -m ray_jobs.pipeline: error: stage collect_acts: ...`
(exit status 2; --traceback shows the stack).
"""

import importlib
import importlib.util
import time

import pyarrow.fs as pafs
import ray

# Before ray.init: in a `ray job submit` driver, torch imported after ray.init (as the lazily
# imported stages would) dies with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"
# (seen on Ray 2.60's fake multi-node cluster, tests/test_autoscale.py).
import torch  # noqa: F401

from mono import cli, store
from mono.errors import UserError

PROG = "python -m ray_jobs.pipeline"
SECTIONS = ("tokens", "lm", "train_lm", "acts", "sae", "sweep", "analysis", "splitting")
STAGES = (  # (job name, library module with run(cfg) and check(cfg))
    ("tokenize", "tokens"),
    ("train_lm", "train_lm"),
    ("collect_acts", "acts"),
    ("sweep_sae", "sweep"),
    ("analyze", "features"),
    ("splitting", "splitting"),
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
        case "splitting":
            return layout.splitting
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


def _stage_check(module: str):
    """mono.<module>.check (its inputs, cheap, without Ray), or None where there is none."""
    if importlib.util.find_spec(f"mono.{module}") is None:
        return None
    return getattr(importlib.import_module(f"mono.{module}"), "check", None)


def _in_stage(stage: str, fn, cfg):
    """fn(cfg); a UserError it raises comes back naming the stage."""
    try:
        return fn(cfg)
    except UserError as err:
        base = cli.user_error(err)
        raise type(base)(f"stage {stage}: {base}") from err


def check_stage(stage: str, module: str, cfg) -> None:
    """Run the stage's input check, if its module has one (a UserError names the stage)."""
    check = _stage_check(module)
    if check is not None:
        _in_stage(stage, check, cfg)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"


def main(argv: list[str] | None = None, init=None) -> list[dict]:
    """Run the stages; returns one dict per stage: stage, ran, seconds, dir, files, bytes."""
    cfg = cli.parse(argv, PROG, __doc__, SECTIONS, init=init,
                    check=lambda c: check_stage(*STAGES[0], c))  # later ones: when reached
    store.write_json(store.Layout(cfg.out).cfg, cfg.to_dict())
    print(f"pipeline: {cfg.out} (config in {store.Layout(cfg.out).cfg})")
    results, missing, t_all = [], None, time.perf_counter()
    for i, (stage, module) in enumerate(STAGES, 1):
        run = None if missing else _stage_run(module)
        if run is not None and stage == "splitting" and len(cfg.sweep.n_features) < 2:
            results.append({"stage": stage, "ran": False,
                            "why": "needs a sweep over >= 2 sizes (--sweep.n_features)"})
            continue
        if run is None:
            why = f"needs {missing}" if missing else f"mono.{module}.run not written yet"
            missing = missing or f"mono.{module}.run"
            results.append({"stage": stage, "ran": False, "why": why})
            continue
        print(f"\n=== [{i}/{len(STAGES)}] {stage}: mono.{module}.run ===", flush=True)
        t0 = time.perf_counter()
        if i > 1:  # the first was checked before Ray started
            check_stage(stage, module, cfg)
        out = _in_stage(stage, run, cfg)
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
    families = store.join(stage_dir("splitting", cfg), "html", "index.html")
    if any(r["ran"] and r["stage"] == "splitting" for r in results):
        print(f"feature splitting: {families}")
    print(f"total {total_s:.1f} s")


if __name__ == "__main__":
    cli.main(main, PROG, init=ray.init)
