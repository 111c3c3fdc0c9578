"""Stage 4: Ray Tune over the sweep grid l1_coeff x lr, one `train_sae.train` per grid point.

Reads what train_sae reads (<out>/acts, <out>/tokens val split, <out>/lm). Writes the Tune
experiment <storage>/<name>/ (storage: sweep.storage_path, default <out>/sweep; a local
path or an s3:// / gs:// URI, which multi-node clusters need):

    sweep.json                       the Config the experiment started with (a rerun must match)
    tuner.pkl, experiment_state-*    Tune's state: rerunning the same command restores it
    <trial>/                         one per grid point: l1_<l1>_lr_<lr>_<trial id>
        params.json result.json progress.csv events.out.tfevents.*   Tune's loggers
        checkpoint_00000N/           the 2 latest train_sae checkpoints (one per eval)
        sae/                         the export (cfg.json, sae.safetensors, sae_lens/) ...
        metrics.json history.json density.npy density.png   ... copied when the trial ends
        wandb/offline-run-*          with --wandb and no WANDB_API_KEY
    trials.json                      the index analysis reads (`index_trials`)
    report/index.html + PNGs         the sweep report (mono.pages.write_sweep_report)

Each trial trains in its local Tune working directory and reports every eval to Tune
(`tune.report` with `tune.Checkpoint.from_directory` of train_sae's checkpoint): the
metrics, and the eval's log10 feature densities as an (F,) array, which Tune's TensorBoard
logger writes as a histogram. A crashed trial is retried `max_failures` times from its last
reported checkpoint (FailureConfig); an interrupted experiment is restored by running the
same command again (`Tuner.restore(resume_errored=True)`): finished trials are kept,
unfinished and errored ones resume from their checkpoints. Every trial streams the shards
in the order seeded by cfg.seed, so grid points see the same batches; resampling inputs
come from one shared `ResamplePool` actor (mono.resample).

Resources: `cpus_per_trial` / `gpus_per_trial` per trial (fractional GPUs pack several SAEs
on one GPU; memory is not isolated, so cap with max_concurrent_trials). Trials read Parquet
with pyarrow threads, not Ray Data, so they need no spare CPU slots; the pool takes none.
With gpus_per_trial = 0, sae.device "auto" means cpu (a trial must not grab a GPU it was
not given).

Limits: a restored experiment keeps the RunConfig it started with (max_failures, W&B);
changing the grid or the SAE settings of an existing experiment is refused (use another
sweep.name). trials.json and the report are written at the end of `run` and by `report`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, replace

import numpy as np
import pyarrow.fs as pafs
import ray
from ray import tune

from mono import cluster, pages, resample, store, train_sae
from mono.config import Config

logger = logging.getLogger(__name__)

SWEEP_JSON, TRIALS_JSON = "sweep.json", "trials.json"
KEEP_CHECKPOINTS = 2
"""Checkpoints kept per trial: the latest (to resume) and the one before (if the latest is
being written when a node dies)."""
TEST_ENV_PREFIX = "MONO_TEST_"
"""Driver variables forwarded to the trials (Ray workers inherit the raylet's environment,
not the driver's): the fault switches of the tests."""
PUBLISHED = (train_sae.METRICS, train_sae.HISTORY, train_sae.DENSITY_PNG)
"""Files of a finished trial's workdir copied next to its sae/ (plus density.npy)."""
DENSITY_FLOOR = -10.0
"""log10 density reported for features that never fired (JSON has no -inf)."""


# --- where things are --------------------------------------------------------------------


def storage_root(cfg: Config) -> str:
    """Tune's storage_path: sweep.storage_path or <out>/sweep (absolute: Tune wants it)."""
    root = cfg.sweep.storage_path or store.Layout(cfg.out).sweep
    return root if store.is_uri(root) else os.path.abspath(root)


def experiment_dir(cfg: Config) -> str:
    """<storage>/<name>: the Tune experiment (a local path or a URI)."""
    return store.join(storage_root(cfg), cfg.sweep.name)


def trial_dirname(trial) -> str:
    """Trial directory names: l1_<l1>_lr_<lr>_<trial id> (the grid point, readable)."""
    c = trial.config
    return f"l1_{c['l1_coeff']:g}_lr_{c['lr']:g}_{trial.trial_id}"


# --- checks before anything starts ----------------------------------------------------


def _identity(cfg: Config) -> dict:
    """What must not change between a sweep's first run and a rerun that restores it."""
    sae = asdict(cfg.sae)
    sae.pop("device")
    return {"out": cfg.out, "seed": cfg.seed, "sae": sae, "name": cfg.sweep.name,
            "l1_coeff": list(cfg.sweep.l1_coeff), "lr": list(cfg.sweep.lr)}


def check_storage(path: str) -> None:
    """Create `path` and write + delete a probe file there; ValueError if that fails."""
    probe = store.join(path, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        store.makedirs(path)
        store.write_bytes_atomic(probe, b"ok")
        store.delete(probe)
    except OSError as err:  # PermissionError, pyarrow's IO and credential errors
        raise ValueError(f"sweep storage {path!r} is not writable: {err}") from err


def check_inputs(cfg: Config) -> dict:
    """Everything a trial needs, checked on the driver before any trial starts: the
    shards, LM and val split (train_sae.check_inputs), a writable experiment dir, and an
    existing experiment of that name that matches this config. Returns
    {"experiment", "restore": bool, "inputs"}."""
    inputs = train_sae.check_inputs(cfg)
    exp = experiment_dir(cfg)
    check_storage(exp)
    restore = tune.Tuner.can_restore(exp)
    saved = store.join(exp, SWEEP_JSON)
    if restore and store.exists(saved):
        before = store.read_json(saved)["identity"]
        now = json.loads(json.dumps(_identity(cfg)))
        diff = sorted(k for k in now if before.get(k) != now[k])
        if diff:
            raise ValueError(f"the experiment {exp} was started with other settings "
                             f"({', '.join(diff)} differ: {[before.get(k) for k in diff]} "
                             f"then, {[now[k] for k in diff]} now); pick another "
                             f"--sweep.name or delete it")
    elif not restore and _trial_dirs(exp):
        raise ValueError(f"{exp} holds trial directories but no restorable Tune state: "
                         f"pick another --sweep.name or delete it")
    return {"experiment": exp, "restore": restore, "inputs": inputs}


# --- one trial ---------------------------------------------------------------------------


def train_trial(config: dict, *, cfg: Config, experiment: str, source, env: dict) -> None:
    """Tune function trainable: train the SAE of grid point `config` (l1_coeff, lr).

    Trains in the trial's local working directory, resuming from Tune's checkpoint when
    there is one (a retry or a restore); reports every eval; at the end copies the export
    and final metrics to <experiment>/<trial>/.
    """
    os.environ.update(env)
    t_enter = time.perf_counter()
    trial_cfg = replace(cfg, sae=replace(cfg.sae, **config))  # unknown keys: TypeError
    name = os.path.basename(tune.get_context().get_trial_dir())
    workdir = os.path.join(os.getcwd(), f"sae-{name}")
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume:
        start = _checkpoint_step(resume)
        setup = {}

        def on_eval(metrics: dict, checkpoint_dir: str) -> None:
            if not setup:  # entry -> first training step, this attempt (see _setup_s)
                setup["s"] = _setup_s(metrics, start, time.perf_counter() - t_enter,
                                      trial_cfg.sae.batch_size)
            result = {**metrics, "setup_s": setup["s"],
                      "log10_density": _log10_density(checkpoint_dir),
                      "node": ray.get_runtime_context().get_node_id()}  # where it ran
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

        train_sae.train(trial_cfg, workdir, source=source, resume_from=resume,
                        on_eval=on_eval)
    publish(workdir, store.join(experiment, name))


def _checkpoint_step(path: str | None) -> int:
    if path is None:
        return 0
    with open(os.path.join(path, train_sae.STATE)) as fh:
        return int(json.load(fh)["step"])


def _setup_s(metrics: dict, start: int, elapsed: float, batch_size: int) -> float:
    """Seconds from entering the trainable to the first training step: the time to the
    first eval less the eval and the training steps before it (from samples_per_s)."""
    steps = metrics["step"] - start
    train_s = steps * batch_size / metrics["samples_per_s"] if metrics["samples_per_s"] else 0
    return max(0.0, elapsed - metrics.get("eval_s", 0.0) - train_s)


def _log10_density(checkpoint_dir: str) -> np.ndarray:
    """(F,) float32 log10 eval densities of a checkpoint (never-fired features at -10)."""
    density = np.load(os.path.join(checkpoint_dir, train_sae.DENSITY))         # (F,)
    with np.errstate(divide="ignore"):
        return np.maximum(np.log10(density), DENSITY_FLOOR).astype(np.float32)


def publish(workdir: str, dest: str) -> None:
    """Copy a finished run's sae/, metrics, history, density histogram and densities from
    its local workdir to the trial dir in storage (sae/ replaced whole)."""
    fs, dest_path = store.resolve(dest)
    sae_dest = f"{dest_path}/{train_sae.EXPORT}"
    if fs.get_file_info(sae_dest).type != pafs.FileType.NotFound:
        fs.delete_dir(sae_dest)
    pafs.copy_files(os.path.join(workdir, train_sae.EXPORT), sae_dest,
                    destination_filesystem=fs)
    files = {f: os.path.join(workdir, f) for f in PUBLISHED}
    files["density.npy"] = os.path.join(workdir, train_sae.CHECKPOINT, train_sae.DENSITY)
    for name, src in files.items():
        with open(src, "rb") as fh:
            store.write_bytes_atomic(store.join(dest, name), fh.read())


# --- the sweep ---------------------------------------------------------------------------


def run(cfg: Config) -> dict:
    """Run (or resume) the sweep; write trials.json and the report. Returns the summary
    {"experiment", "trials_json", "report", "trials", "restored", "wall_s"}; raises
    RuntimeError after writing them if a trial did not finish (rerun to resume it)."""
    t0 = time.perf_counter()
    if cfg.sweep.gpus_per_trial > 0:
        cluster.check_gpus("--sweep.gpus_per_trial")  # trials would wait forever otherwise
    if cfg.sweep.gpus_per_trial == 0 and cfg.sae.device == "auto":
        cfg = replace(cfg, sae=replace(cfg.sae, device="cpu"))
    checked = check_inputs(cfg)
    exp, restoring = checked["experiment"], checked["restore"]
    if not restoring:
        store.write_json(store.join(exp, SWEEP_JSON),
                         {"identity": _identity(cfg), "config": cfg.to_dict()})
    pool = resample.start_pool(cfg.out, resample.pool_name(exp), cfg.sweep.pool_rows,
                               cfg.seed, cfg.sweep.pool_rows_per_group)
    env = {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, cfg=cfg, experiment=exp,
                             source=resample.PoolClient(pool), env=env),
        {"cpu": cfg.sweep.cpus_per_trial, "gpu": cfg.sweep.gpus_per_trial})
    if cfg.sweep.wandb:
        _wandb_offline()
    try:
        if restoring:
            logger.info("sweep: restoring %s (finished trials are kept)", exp)
            tuner = tune.Tuner.restore(exp, trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space(cfg),
                               tune_config=_tune_config(cfg), run_config=_run_config(cfg))
        tuner.fit()
    finally:  # the pool is the driver's: free its memory now, not at driver exit
        ray.kill(pool, no_restart=True)
    summary = report(cfg) | {"restored": restoring, "wall_s": time.perf_counter() - t0}
    bad = [t for t in summary["trials"] if t["status"] != "done"]
    if bad:
        raise RuntimeError(
            f"{len(bad)} of {len(summary['trials'])} trials did not finish: "
            f"{[(t['name'], t['status'], t.get('error')) for t in bad]}; see error.txt in "
            f"their dirs under {exp}; rerun the same command to resume them")
    return summary


def param_space(cfg: Config) -> dict:
    """The grid: keys are SaeConfig field names (the trial does replace(cfg.sae, **config))."""
    return {"l1_coeff": tune.grid_search(list(cfg.sweep.l1_coeff)),
            "lr": tune.grid_search(list(cfg.sweep.lr))}


def _wandb_offline() -> dict:
    """Without WANDB_API_KEY, W&B writes offline runs (`wandb sync` uploads them later):
    WANDB_MODE=offline stops the driver's login check (also on a restore, whose callback
    comes from the saved experiment); `mode` reaches the logging actors, which do not
    inherit the driver's environment. -> extra WandbLoggerCallback arguments."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "offline") != "offline":
        return {}
    os.environ["WANDB_MODE"] = "offline"
    return {"mode": "offline"}


def _tune_config(cfg: Config) -> tune.TuneConfig:
    return tune.TuneConfig(max_concurrent_trials=cfg.sweep.max_concurrent_trials or None,
                           trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname)


def _run_config(cfg: Config) -> tune.RunConfig:
    callbacks = []
    if cfg.sweep.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project="mono", group=cfg.sweep.name,
                                             excludes=["log10_density"], **_wandb_offline()))
    return tune.RunConfig(
        name=cfg.sweep.name, storage_path=storage_root(cfg), callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS))


# --- the index and the report ----------------------------------------------------------


def report(cfg: Config) -> dict:
    """Rebuild trials.json and the report of cfg's experiment from its files (no Ray);
    returns {"experiment", "trials_json", "report", "trials"}."""
    exp = experiment_dir(cfg)
    if not _trial_dirs(exp):
        raise FileNotFoundError(f"no trials in {exp}: run the sweep first")
    trials = index_trials(exp)
    return {"experiment": exp, "trials_json": store.join(exp, TRIALS_JSON),
            "report": pages.write_sweep_report(exp), "trials": trials}


def _trial_dirs(exp: str) -> list[str]:
    fs, path = store.resolve(exp)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                  and fs.get_file_info(f"{i.path}/params.json").type == pafs.FileType.File)


def index_trials(exp: str) -> list[dict]:
    """Read every trial dir of `exp` and write <exp>/trials.json: {"experiment", "trials":
    [entry, ...]} sorted by (l1_coeff, lr). An entry: name (the dir), trial_id, l1_coeff,
    lr, status (done | error | unfinished), dir, sae_dir (done only), metrics (the final
    metrics.json; done only), last_report (the last metrics Tune got), reports (how many),
    error (the first line of error.txt, if not done)."""
    trials = [_trial_entry(exp, name) for name in _trial_dirs(exp)]
    trials.sort(key=lambda t: (t["l1_coeff"], t["lr"], t["name"]))
    store.write_json(store.join(exp, TRIALS_JSON), {"experiment": exp, "trials": trials})
    return trials


def _trial_entry(exp: str, name: str) -> dict:
    d = store.join(exp, name)
    params = store.read_json(store.join(d, "params.json"))
    lines = []
    if store.exists(store.join(d, "result.json")):
        lines = store.read_bytes(store.join(d, "result.json")).decode().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    entry = {"name": name, "trial_id": last.get("trial_id", "_".join(name.split("_")[-2:])),
             "l1_coeff": params["l1_coeff"], "lr": params["lr"], "dir": d,
             "reports": len(lines), "last_report": _metrics_only(last),
             "node": last.get("node")}  # the Ray node id of the trial's last report
    done = all(store.exists(store.join(d, train_sae.EXPORT, f))
               for f in ("cfg.json", train_sae.SAE_WEIGHTS)) and store.exists(
        store.join(d, train_sae.METRICS))
    if done:
        entry |= {"status": "done", "sae_dir": store.join(d, train_sae.EXPORT),
                  "metrics": store.read_json(store.join(d, train_sae.METRICS))}
    else:
        error = store.join(d, "error.txt")
        entry["status"] = "error" if store.exists(error) else "unfinished"
        if entry["status"] == "error":
            text = store.read_bytes(error).decode(errors="replace").strip().splitlines()
            entry["error"] = next((ln for ln in reversed(text) if ln.strip()), "")[:500]
    return entry


def _metrics_only(result: dict) -> dict:
    """A Tune result line without Tune's bookkeeping and the density array."""
    skip = {"config", "log10_density", "done", "should_checkpoint", "checkpoint_dir_name",
            "node_ip", "hostname", "pid", "date", "trial_id", "experiment_tag"}
    return {k: v for k, v in result.items() if k not in skip
            and isinstance(v, (int, float)) and (not isinstance(v, float) or math.isfinite(v))}
