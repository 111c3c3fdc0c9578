"""Stage 4: Ray Tune over the sweep grid l1_coeff x lr, one `train_sae.train` per grid point.

Reads what train_sae reads (<out>/acts, <out>/tokens val split, <out>/lm). Writes the Tune
experiment <storage>/<name>/ (storage: sweep.storage_path, default <out>/sweep; a local
path or an s3:// / gs:// URI, which multi-node clusters need):

    sweep.json                       the Config the experiment started with (a rerun must match)
    tuner.pkl, experiment_state-*    Tune's state: rerunning the same command restores it
    <trial>/                         one per grid point: [F_<size>_]l1_<l1>_lr_<lr>_<trial id>
        params.json result.json progress.csv events.out.tfevents.*   Tune's loggers
        checkpoint_00000N/           the 2 latest train_sae checkpoints (one per eval)
        sae/                         the export (cfg.json, sae.safetensors, sae_lens/) ...
        metrics.json history.json density.npy density.png   ... copied when the trial ends
                                     (mono.trial.publish)
        wandb/offline-run-*          with --wandb and no WANDB_API_KEY
    pack<K>_l1_<l1>_lr_<lr>_<id>/    a packed trial (sweep.pack, mono.pack): K grid points
        checkpoint_00000N/<name>/    one train_sae checkpoint per member
        sae/<name>/                  each member's export + metrics.json history.json
                                     density.npy density.png (failed.json if it diverged)
    trials.json                      the index analysis reads (`index_trials`): one row per
                                     SAE (a pack member's name: <trial>/<name>)
    report/index.html + PNGs         the sweep report (mono.pages.write_sweep_report)

What runs inside one trial (the trainables, the rows they report to Tune, the files they
publish next to sae/) is mono.trial; this module is the experiment around the trials: its
storage and checks, the grid (param_space; packs sized by pack_size), the Tuner (set up or
restored), the reporter and callbacks, trials.json and the report. Tune's metric is
mono.trial.HEADLINE (mode max). Rows hold scalars only: the log10 training-window
densities (F,) reach TensorBoard as a histogram that `DensityHistograms` writes on the
driver from each eval checkpoint's density.npy. Tune restores a retried trial's
result.json from its last sync to storage, so rows reported after that sync and before
the crash are missing there.

A crashed trial is retried `max_failures` times from its last reported checkpoint
(FailureConfig); an interrupted experiment is restored by running the
same command again (`Tuner.restore(resume_errored=True)`): finished trials are kept,
unfinished and errored ones resume from their checkpoints. Every trial streams the shards
in the order seeded by cfg.seed, so grid points see the same batches, and resample from
the same inputs: one draw per resample step, seeded by (seed, step), that the
experiment's `ResampleService` actor computes once and hands to every trial by reference
(mono.resample; a retried trial gets the same draw).

Resources: `cpus_per_trial` / `gpus_per_trial` per trial (fractional GPUs pack several SAEs
on one GPU; memory is not isolated, so cap with max_concurrent_trials). Trials read Parquet
with pyarrow threads, not Ray Data, so they need no spare CPU slots; the service takes none.
With gpus_per_trial = 0, sae.device "auto" means cpu (a trial must not grab a GPU it was
not given).

Limits: a restored experiment keeps the RunConfig it started with (max_failures, W&B);
changing the grid or the SAE settings of an existing experiment is refused (use another
sweep.name). trials.json and the report are written at the end of `run` and by `report`.
"""

from __future__ import annotations

import io
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

from mono import cluster, pack, pages, resample, sae_files, store, threads, train_sae
from mono.config import Config
from mono.errors import BadOutput, MissingInput, UserError
from mono.trial import HEADLINE, train_pack_trial, train_trial

logger = logging.getLogger(__name__)

SWEEP_JSON, TRIALS_JSON = "sweep.json", "trials.json"
KEEP_CHECKPOINTS = 2
"""Checkpoints kept per trial: the latest (to resume) and the one before (if the latest is
being written when a node dies)."""
TEST_ENV_PREFIX = "MONO_TEST_"
"""Driver variables forwarded to the trials (Ray workers inherit the raylet's environment,
not the driver's): the fault switches of the tests."""
DENSITY_FLOOR = -10.0
"""log10 density written for features that never fired (TensorBoard histograms)."""
DEFAULT_GPU_BYTES = 24 * 2**30
"""GPU memory assumed by `pack_size` when the driver sees no GPU: cluster.yaml's g5 nodes
(NVIDIA A10G, 24 GiB)."""
STATUS_COLUMNS = {"train_l0": "L0", HEADLINE: "loss rec.", "dead_fraction": "dead",
                  "timesteps_total": "step"}
"""The status table's metric columns (the classic CLIReporter; the default reporter shows
the first four scalars of each result, which `mono.trial.trial_result` orders the same way)."""


# --- where things are --------------------------------------------------------------------


def storage_root(cfg: Config) -> str:
    """Tune's storage_path: sweep.storage_path or <out>/sweep (absolute: Tune wants it)."""
    root = cfg.sweep.storage_path or store.Layout(cfg.out).sweep
    return root if store.is_uri(root) else os.path.abspath(root)


def experiment_dir(cfg: Config) -> str:
    """<storage>/<name>: the Tune experiment (a local path or a URI)."""
    return store.join(storage_root(cfg), cfg.sweep.name)


def trial_dirname(trial) -> str:
    """Trial directory names: [F_<n_features>_]l1_<l1>_lr_<lr>_<trial id> (the grid point,
    readable; F_ when dictionary size is an axis), or [F_<n_features>_]pack<K>_l1_<l1>_lr_<lr>_
    <trial id> (a pack, by its first member)."""
    c = trial.config
    size = f"F_{c['n_features']}_" if "n_features" in c else ""
    if "pack" in c:
        first = c["pack"][0]
        return f"{size}pack{len(c['pack'])}_l1_{first['l1_coeff']:g}_lr_{first['lr']:g}_" \
               f"{trial.trial_id}"
    return f"{size}l1_{c['l1_coeff']:g}_lr_{c['lr']:g}_{trial.trial_id}"


# --- checks before anything starts ----------------------------------------------------


def _identity(cfg: Config) -> dict:
    """What must not change between a sweep's first run and a rerun that restores it."""
    sae = asdict(cfg.sae)
    sae.pop("device")
    return {"out": cfg.out, "seed": cfg.seed, "sae": sae, "name": cfg.sweep.name,
            "l1_coeff": list(cfg.sweep.l1_coeff), "lr": list(cfg.sweep.lr),
            "pack": cfg.sweep.pack, "n_features": list(cfg.sweep.n_features)}


def check_storage(path: str) -> None:
    """Create `path` and write + delete a probe file there; BadOutput if that fails."""
    probe = store.join(path, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        store.makedirs(path)
        store.write_bytes_atomic(probe, b"ok")
        store.delete(probe)
    except OSError as err:  # PermissionError, pyarrow's IO and credential errors
        raise BadOutput(f"sweep storage {path!r} is not writable: {err}") from err


def check_inputs(cfg: Config) -> dict:
    """Everything a trial needs, checked on the driver before any trial starts: the
    shards, LM and val split (train_sae.check_inputs), a writable experiment dir, and an
    existing experiment of that name that matches this config. Returns
    {"experiment", "restore": bool, "inputs"}."""
    inputs = train_sae.check_inputs(cfg)
    # the schedule's warnings once on the driver, not only in every trial's log
    train_sae.check_schedule(cfg.sae, train_sae.plan_steps(cfg.sae, inputs["rows"])[0])
    exp = experiment_dir(cfg)
    check_storage(exp)
    restore = tune.Tuner.can_restore(exp)
    saved = store.join(exp, SWEEP_JSON)
    if restore and store.exists(saved):
        before = store.read_json(saved)["identity"]
        now = json.loads(json.dumps(_identity(cfg)))
        diff = sorted(k for k in now if before.get(k) != now[k])
        if diff:
            raise UserError(f"the experiment {exp} was started with other settings "
                            f"({', '.join(diff)} differ: {[before.get(k) for k in diff]} "
                            f"then, {[now[k] for k in diff]} now); pick another "
                            f"--sweep.name or delete it")
    elif not restore and _trial_dirs(exp):
        raise UserError(f"{exp} holds trial directories but no restorable Tune state: "
                        f"pick another --sweep.name or delete it")
    return {"experiment": exp, "restore": restore, "inputs": inputs}


def check(cfg: Config) -> None:
    """The job's input check before Ray starts (mono.cli): `check_inputs`."""
    check_inputs(cfg)


# --- TensorBoard density histograms (driver side) ----------------------------------


def log10_density(density: np.ndarray) -> np.ndarray:
    """(F,) float32 log10 of training-window densities (F,) (never fired: DENSITY_FLOOR)."""
    with np.errstate(divide="ignore"):
        return np.maximum(np.log10(density), DENSITY_FLOOR).astype(np.float32)


class DensityHistograms(tune.Callback):
    """Driver-side: each eval checkpoint's log10 feature densities as a TensorBoard
    histogram in the trial dir (beside Tune's scalars, x = the SAE step), read from the
    checkpoint's density.npy, so the (F,) array never enters a result row (result.json,
    progress.csv, the experiment state)."""

    def __init__(self):
        self._writers: dict = {}

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        fs, path = checkpoint.filesystem, checkpoint.path
        if fs.get_file_info(f"{path}/{sae_files.STATE}").type == pafs.FileType.File:
            runs = [("ray/tune/log10_density", path)]
        else:  # a pack's checkpoint: one train_sae checkpoint per member
            runs = [(f"ray/tune/{i.base_name}/log10_density", i.path)
                    for i in fs.get_file_info(pafs.FileSelector(path))
                    if fs.get_file_info(f"{i.path}/{sae_files.STATE}").type
                    == pafs.FileType.File]
        for tag, run in runs:
            self._write(trial, fs, tag, run)

    def _write(self, trial, fs, tag: str, path: str) -> None:
        with fs.open_input_file(f"{path}/{sae_files.STATE}") as fh:
            state = json.loads(fh.read())
        history = state.get("history") or [{}]
        if history[-1].get("step") != state["step"]:  # not an eval step: nothing new
            return
        with fs.open_input_file(f"{path}/{sae_files.DENSITY}") as fh:
            density = np.load(io.BytesIO(fh.read()))                           # (F,)
        writer = self._writers.get(trial.trial_id)
        if writer is None:
            from tensorboardX import SummaryWriter  # Tune's own TensorBoard dependency

            trial.init_local_path()
            writer = SummaryWriter(trial.local_path, filename_suffix=".density")
            self._writers[trial.trial_id] = writer
        writer.add_histogram(tag, log10_density(density), global_step=state["step"])
        writer.flush()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial)

    def _close(self, trial) -> None:
        writer = self._writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()

    def __getstate__(self):  # Tune pickles its callbacks with the experiment
        return {"_writers": {}}




# --- the sweep ---------------------------------------------------------------------------


@threads.pinned()  # its driver computes too: every core, not the job's 1 CPU
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
    saved = store.join(exp, SWEEP_JSON)
    if restoring and store.exists(saved) and "pack_size" in store.read_json(saved):
        k = store.read_json(saved)["pack_size"]   # the trials as they were first made
    else:
        k = pack_size(cfg, checked["inputs"]["H"])
    if not restoring:
        store.write_json(saved, {"identity": _identity(cfg), "config": cfg.to_dict(),
                                 "pack_size": k})
    logger.info("sweep: %d grid points, %s", len(grid_points(cfg)),
                f"packs of up to {k} SAEs per trial" if k > 1 else "one SAE per trial")
    inputs = checked["inputs"]
    n_steps = train_sae.plan_steps(cfg.sae, inputs["rows"])[0]
    service = resample.start_service(
        cfg.out, resample.service_name(exp), cfg.seed,
        [s for s in cfg.sae.resample_at if s < n_steps],
        min(cfg.sae.resample_inputs, inputs["rows"]), inputs["H"], cfg.sweep.draw_rows_per_group)
    env = {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}
    trainable = tune.with_resources(
        tune.with_parameters(train_pack_trial if k > 1 else train_trial, cfg=cfg,
                             experiment=exp,
                             source=resample.SharedDraw(service), env=env),
        {"cpu": cfg.sweep.cpus_per_trial, "gpu": cfg.sweep.gpus_per_trial})
    if cfg.sweep.wandb:
        _wandb_offline()
    try:
        if restoring:
            logger.info("sweep: restoring %s (finished trials are kept)", exp)
            tuner = tune.Tuner.restore(exp, trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space(cfg, k),
                               tune_config=_tune_config(cfg), run_config=_run_config(cfg))
        tuner.fit()
    finally:  # the service is the driver's: free its draws now, not at driver exit
        ray.kill(service, no_restart=True)
    summary = report(cfg) | {"restored": restoring, "wall_s": time.perf_counter() - t0}
    bad = [t for t in summary["trials"] if t["status"] != "done"]
    if bad:
        raise RuntimeError(
            f"{len(bad)} of {len(summary['trials'])} trials did not finish: "
            f"{[(t['name'], t['status'], t.get('error')) for t in bad]}; see error.txt in "
            f"their dirs under {exp}; rerun the same command to resume them")
    return summary


def param_space(cfg: Config, k: int = 1) -> dict:
    """The grid: keys are SaeConfig field names (the trial does replace(cfg.sae, **config));
    with k > 1, {"pack": grid_search over the grid points in packs of up to k}; n_features
    (only when the sweep sets sizes) is an axis of its own, so a pack holds one size."""
    sizes = {"n_features": tune.grid_search(list(cfg.sweep.n_features))} \
        if cfg.sweep.n_features else {}
    if k <= 1:
        return {"l1_coeff": tune.grid_search(list(cfg.sweep.l1_coeff)),
                "lr": tune.grid_search(list(cfg.sweep.lr))} | sizes
    points = grid_points(cfg)
    n = -(-len(points) // -(-len(points) // k))   # even packs: 5 points at k 4 -> 3 + 2
    return {"pack": tune.grid_search([points[i:i + n] for i in range(0, len(points), n)])} \
        | sizes


def grid_points(cfg: Config) -> list[dict]:
    """Every (l1_coeff, lr) point of the grid, in the order Tune's grid_search makes them
    (per dictionary size, when sizes are an axis)."""
    return [{"l1_coeff": l1, "lr": lr} for lr in cfg.sweep.lr for l1 in cfg.sweep.l1_coeff]


def pack_size(cfg: Config, H: int) -> int:
    """SAEs per trial: sweep.pack, or (0) as many as fit the trial's device memory
    (`pack.pack_memory` per SAE against 80% of gpus_per_trial x the GPU's memory, or of
    half the node's RAM shared by the concurrent trials on CPU), at most the grid."""
    n = len(grid_points(cfg))
    if cfg.sweep.pack:
        return min(cfg.sweep.pack, n)
    largest = max(cfg.sweep.n_features, default=cfg.sae.n_features)
    per_sae = pack.pack_memory(replace(cfg, sae=replace(cfg.sae, n_features=largest)), H)
    sw = cfg.sweep
    if sw.gpus_per_trial > 0:
        import torch

        gpu = (torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available()
               else DEFAULT_GPU_BYTES)   # the driver (head node) often has no GPU
        budget = 0.8 * gpu * min(1.0, sw.gpus_per_trial)
    else:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = 0.5 * ram / max(1, sw.max_concurrent_trials or 1)
    return max(1, min(n, int(budget // per_sae)))


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
    return tune.TuneConfig(metric=HEADLINE, mode="max",
                           max_concurrent_trials=cfg.sweep.max_concurrent_trials or None,
                           trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname)


def _run_config(cfg: Config) -> tune.RunConfig:
    callbacks = [DensityHistograms()]
    if cfg.sweep.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project="mono", group=cfg.sweep.name,
                                             **_wandb_offline()))
    # The classic table when RAY_AIR_NEW_OUTPUT=0 (otherwise Tune ignores it, with a warning)
    reporter = None
    if os.environ.get("RAY_AIR_NEW_OUTPUT", "1") == "0":
        reporter = tune.CLIReporter(metric_columns=STATUS_COLUMNS,
                                    parameter_columns={"l1_coeff": "l1", "lr": "lr"},
                                    metric=HEADLINE, mode="max")
    return tune.RunConfig(
        name=cfg.sweep.name, storage_path=storage_root(cfg), callbacks=callbacks,
        progress_reporter=reporter,
        failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS))


# --- the index and the report ----------------------------------------------------------


def report(cfg: Config) -> dict:
    """Rebuild trials.json and the report of cfg's experiment from its files (no Ray);
    returns {"experiment", "trials_json", "report", "trials"}."""
    exp = experiment_dir(cfg)
    if not _trial_dirs(exp):
        raise MissingInput(f"no trials in {exp}: run the sweep first")
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
    [entry, ...]} sorted by (l1_coeff, lr, n_features). An entry: name (the dir), trial_id,
    l1_coeff, lr, n_features (None unless the sweep sets sizes), status (done | error |
    unfinished), dir, sae_dir (done only), metrics (the final metrics.json; done only),
    last_report (the last metrics Tune got), reports (how many), error (the first line of
    error.txt, if not done)."""
    trials = [e for name in _trial_dirs(exp) for e in _trial_entries(exp, name)]
    trials.sort(key=lambda t: (t["l1_coeff"], t["lr"], t["n_features"] or 0, t["name"]))
    store.write_json(store.join(exp, TRIALS_JSON), {"experiment": exp, "trials": trials})
    return trials


def _trial_entries(exp: str, name: str) -> list[dict]:
    """One entry per SAE of a trial dir: the trial's, or one per member of a pack (name
    <trial>/<member>, dir and sae_dir <trial>/sae/<member>, trial: the pack's dir name)."""
    d = store.join(exp, name)
    params = store.read_json(store.join(d, "params.json"))
    if "pack" not in params:
        return [_trial_entry(exp, name)]
    result = _last_result(d)   # read once: the pack's entry and every member's report
    whole = _trial_entry(exp, name, params={"l1_coeff": None, "lr": None,
                                                 "n_features": params.get("n_features")},
                         result=result)
    members = result[1].get("members") or {}
    out = []
    for member in params["pack"]:
        m = pack.member_name(member)
        md = store.join(d, sae_files.EXPORT, m)
        entry = {**whole, "name": f"{name}/{m}", "trial": name, "dir": md, **member,
                 # a pack member's last row: its members/<name> scalars
                 "last_report": _metrics_only(members.get(m, {}))}
        if all(store.exists(store.join(md, f)) for f in ("cfg.json", sae_files.SAE_WEIGHTS,
                                                          sae_files.METRICS)):
            entry.pop("error", None)
            entry |= {"status": "done", "sae_dir": md,
                      "metrics": store.read_json(store.join(md, sae_files.METRICS))}
        elif store.exists(store.join(md, pack.FAILED)):
            failed = store.read_json(store.join(md, pack.FAILED))
            entry |= {"status": "error",
                      "error": f"diverged at step {failed['step']}: {failed['error']}"[:500]}
        out.append(entry)
    return out


def _last_result(trial_dir: str) -> tuple[int, dict]:
    """(rows, last row) of a trial dir's result.json (Tune's one JSON line per report);
    (0, {}) when there is none."""
    path = store.join(trial_dir, "result.json")
    if not store.exists(path):
        return 0, {}
    lines = store.read_bytes(path).decode().splitlines()
    return len(lines), json.loads(lines[-1]) if lines else {}


def _trial_entry(exp: str, name: str, params: dict | None = None,
                 result: tuple[int, dict] | None = None) -> dict:
    """result: `_last_result` of the trial dir, when the caller read it already."""
    d = store.join(exp, name)
    params = params or store.read_json(store.join(d, "params.json"))
    reports, last = result if result is not None else _last_result(d)
    entry = {"name": name, "trial_id": last.get("trial_id", "_".join(name.split("_")[-2:])),
             "l1_coeff": params["l1_coeff"], "lr": params["lr"],
             "n_features": params.get("n_features"), "dir": d,
             "reports": reports, "last_report": _metrics_only(last),
             # the Ray node id of the trial's last report, and its torch threads
             "node": last.get("node"), "threads": last.get("threads")}
    done = all(store.exists(store.join(d, sae_files.EXPORT, f))
               for f in ("cfg.json", sae_files.SAE_WEIGHTS)) and store.exists(
        store.join(d, sae_files.METRICS))
    if done:
        entry |= {"status": "done", "sae_dir": store.join(d, sae_files.EXPORT),
                  "metrics": store.read_json(store.join(d, sae_files.METRICS))}
    else:
        error = store.join(d, "error.txt")
        entry["status"] = "error" if store.exists(error) else "unfinished"
        if entry["status"] == "error":
            text = store.read_bytes(error).decode(errors="replace").strip().splitlines()
            entry["error"] = next((ln for ln in reversed(text) if ln.strip()), "")[:500]
    return entry


def _metrics_only(result: dict) -> dict:
    """A Tune result line's finite scalars, without Tune's bookkeeping."""
    skip = {"config", "done", "should_checkpoint", "checkpoint_dir_name",
            "node_ip", "hostname", "pid", "date", "trial_id", "experiment_tag"}
    return {k: v for k, v in result.items() if k not in skip
            and isinstance(v, (int, float)) and (not isinstance(v, float) or math.isfinite(v))}
