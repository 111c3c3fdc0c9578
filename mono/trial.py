"""Stage 4, inside one Tune trial: the function trainables that mono.sweep hands to Tune.

`train_trial` trains the SAE of one grid point (config {l1_coeff, lr[, n_features]}),
`train_pack_trial` a pack of them on one stream (config {"pack": [{l1_coeff, lr}, ...]},
mono.pack). Both read what train_sae reads (<out>/acts, <out>/tokens val split, <out>/lm)
and the experiment's resampling draws (`source`, a mono.resample.SharedDraw); they train
in the trial's local Tune working directory (sae-<trial>/ or pack-<trial>/), resuming
from Tune's checkpoint when there is one (a retry or a restore), and write to
<experiment>/<trial>/ in the sweep storage when they finish (`publish`, `publish_pack`):

    sae/                             the export (cfg.json, sae.safetensors, sae_lens/)
    metrics.json history.json density.npy density.png
    sae/<name>/                      a pack: each member's export + the same four files
                                     (failed.json instead if the member diverged)

Tune's loggers write the rest of the trial dir from the rows reported here. A trial reports
every `sae.report_interval` steps (the cheap scalars: train loss / MSE / L0 since the last
report, dead fraction) and at every checkpoint (evals, checkpoint_interval, the end; with
`tune.Checkpoint.from_directory` of train_sae's checkpoint and, at evals, every eval
metric). `timesteps_total` is the SAE step, so TensorBoard and W&B plot against it; Tune's
metric is HEADLINE (mode max), and every row carries the last eval's metrics (`eval_step`
says which eval), so Tune's status table shows l1_coeff, lr, step, L0, loss recovered and
dead throughout. Rows hold scalars only (`trial_result`); a pack reports one row per step
at which every live member reported (`pack_result`), with one checkpoint of all members.
A retry repeats the reports between its checkpoint and the crash (same timesteps_total).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import replace

import numpy as np
import pyarrow.fs as pafs
import ray
from ray import tune

from mono import pack, pages, sae_files, store, threads, train_sae
from mono.config import Config

PUBLISHED = (sae_files.METRICS, sae_files.HISTORY, sae_files.DENSITY_PNG)
"""Files of a finished trial's workdir copied next to its sae/ (plus density.npy)."""
HEADLINE = pages.HEADLINE
"""Tune's metric (mode max): loss recovered against mean ablation (DESIGN.md: the sweep's
headline)."""


# --- the trainables ----------------------------------------------------------------------


def train_trial(config: dict, *, cfg: Config, experiment: str, source, env: dict) -> None:
    """Tune function trainable: train the SAE of grid point `config` (l1_coeff, lr).

    Trains in the trial's local working directory, resuming from Tune's checkpoint when
    there is one (a retry or a restore); reports to Tune every report_interval steps and at
    every checkpoint (`trial_result`); at the end copies the export and final metrics to
    <experiment>/<trial>/.
    """
    os.environ.update(env)
    n_threads = threads.pin()  # the trial's cpus_per_trial, whatever the worker ran before
    t_enter = time.perf_counter()
    trial_cfg = replace(cfg, sae=replace(cfg.sae, **config))  # unknown keys: TypeError
    name = os.path.basename(tune.get_context().get_trial_dir())
    workdir = os.path.join(os.getcwd(), f"sae-{name}")
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume:
        start = _checkpoint_step(resume)
        last_eval, setup = {}, {}

        def on_report(result: dict, checkpoint_dir: str | None) -> None:
            if "L_sae" in result:  # an eval step
                last_eval.clear()
                last_eval.update(result)
                if not setup:  # entry -> first training step, this attempt (see _setup_s)
                    setup["s"] = _setup_s(result, start, time.perf_counter() - t_enter,
                                          trial_cfg.sae.batch_size)
            row = trial_result(result, last_eval) | ({"setup_s": setup["s"]} if setup else {}) \
                | {"node": ray.get_runtime_context().get_node_id(),  # where it ran
                   "threads": n_threads}
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir)
                        if checkpoint_dir else None)

        train_sae.train(trial_cfg, workdir, source=source, resume_from=resume,
                        on_report=on_report)
    publish(workdir, store.join(experiment, name))


def train_pack_trial(config: dict, *, cfg: Config, experiment: str, source,
                     env: dict) -> None:
    """Tune function trainable of a pack (config {"pack": [{l1_coeff, lr}, ...]}): the
    members train on one stream (mono.pack) in the trial's working directory, resuming
    from Tune's pack checkpoint (<name>/ per member); one Tune report per step at which
    every live member reported (`pack_result`), with one checkpoint of all members; at
    the end each member's export and metrics go to <experiment>/<trial>/sae/<name>/."""
    os.environ.update(env)
    n_threads = threads.pin()  # the trial's cpus_per_trial, whatever the worker ran before
    name = os.path.basename(tune.get_context().get_trial_dir())
    workdir = os.path.join(os.getcwd(), f"pack-{name}")
    checkpoint = tune.get_checkpoint()
    # other grid axes (e.g. a dictionary size) apply to the whole pack: sizes never mix
    trial_cfg = replace(cfg, sae=replace(cfg.sae, **{k: v for k, v in config.items()
                                                      if k != "pack"}))
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume:
        p = pack.Pack(trial_cfg, config["pack"], workdir, source=source, resume_from=resume)
        pending: dict[int, dict] = {}
        last_eval: dict[str, dict] = {n: {} for n in p.runs}

        def on_report(member: str, result: dict, checkpoint_dir: str | None) -> None:
            if "L_sae" in result:  # an eval step
                last_eval[member] = result
            step = result["step"]
            pending.setdefault(step, {})[member] = (result, checkpoint_dir)
            if not set(p.live()) <= set(pending[step]):
                return
            rows = pending.pop(step)
            for old in [s for s in pending if s < step]:  # a lagging member's catch-up
                del pending[old]
            row = pack_result({m: trial_result(r, last_eval[m]) for m, (r, _) in rows.items()},
                              step) | {"node": ray.get_runtime_context().get_node_id(),
                                       "threads": n_threads}
            paths = {m: c for m, (_, c) in rows.items() if c}
            if not paths:
                tune.report(row)
                return
            with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp:
                members = {**paths, **{m: None for m in p.status}}
                ckpt = pack.pack_checkpoint(os.path.join(tmp, "pack"), members, workdir)
                tune.report(row, checkpoint=tune.Checkpoint.from_directory(ckpt))

        p.fit(on_report)
        status = p.finish()
    publish_pack(workdir, status, store.join(experiment, name))


# --- Tune's result rows ------------------------------------------------------------------


def pack_result(members: dict[str, dict], step: int) -> dict:
    """A pack's Tune row: the status-table keys of its best member (by HEADLINE), then
    every member's scalars under members/<name>/..."""
    def key(m):
        v = members[m][HEADLINE]
        return v if isinstance(v, float) and math.isfinite(v) else -math.inf

    best = max(members, key=key)
    row = {k: members[best][k] for k in ("train_l0", HEADLINE, "dead_fraction", "train_loss")}
    return row | {"timesteps_total": step, "step": step, "best_member": best,
                  "members": members}


def headline(metrics: dict) -> float:
    """The sweep's headline from an eval's metrics; NaN before the first eval."""
    return metrics.get(HEADLINE, float("nan"))


def trial_result(result: dict, last_eval: dict) -> dict:
    """One Tune result row from train_sae's report: scalars only (never per-feature
    arrays). The first keys are what Tune's status table shows beside l1_coeff, lr and ts
    (= timesteps_total = the SAE step): train_l0, the headline of the last eval, the dead
    fraction and train_loss; then the last eval's metrics (`eval_step` says which), and
    the report's own."""
    row = {"train_l0": result.get("train_l0", float("nan")),
           HEADLINE: headline(last_eval), "dead_fraction": result["dead_fraction"],
           "train_loss": result.get("train_loss", float("nan")),
           "timesteps_total": result["step"]}
    if last_eval:
        row["eval_step"] = last_eval["step"]
        row |= {k: v for k, v in last_eval.items() if k not in row and _scalar(v)}
    row |= {k: v for k, v in result.items() if _scalar(v)}
    return row


def _scalar(v) -> bool:
    return isinstance(v, (bool, int, float, np.integer, np.floating))


def _checkpoint_step(path: str | None) -> int:
    if path is None:
        return 0
    with open(os.path.join(path, sae_files.STATE)) as fh:
        return int(json.load(fh)["step"])


def _setup_s(metrics: dict, start: int, elapsed: float, batch_size: int) -> float:
    """Seconds from entering the trainable to the first training step: the time to the
    first eval less the eval and the training steps before it (from samples_per_s)."""
    steps = metrics["step"] - start
    train_s = steps * batch_size / metrics["samples_per_s"] if metrics["samples_per_s"] else 0
    return max(0.0, elapsed - metrics.get("eval_s", 0.0) - train_s)


# --- a finished trial's files in storage -------------------------------------------


def publish(workdir: str, dest: str, export_to: str | None = None) -> None:
    """Copy a finished run's sae/, metrics, history, density histogram and densities from
    its local workdir to the trial dir in storage (sae/ replaced whole; export_to: put the
    export there instead of <dest>/sae)."""
    fs, dest_path = store.resolve(dest)
    sae_dest = store.resolve(export_to)[1] if export_to else f"{dest_path}/{sae_files.EXPORT}"
    if fs.get_file_info(sae_dest).type != pafs.FileType.NotFound:
        fs.delete_dir(sae_dest)
    pafs.copy_files(os.path.join(workdir, sae_files.EXPORT), sae_dest,
                    destination_filesystem=fs)
    files = {f: os.path.join(workdir, f) for f in PUBLISHED}
    files["density.npy"] = os.path.join(workdir, sae_files.CHECKPOINT, sae_files.DENSITY)
    for name, src in files.items():
        with open(src, "rb") as fh:
            store.write_bytes_atomic(store.join(dest, name), fh.read())


def publish_pack(workdir: str, status: dict[str, dict], dest: str) -> None:
    """Each finished member's export + metrics to <dest>/sae/<name>/ (what `publish` puts
    in a one-SAE trial dir), a failed member's failed.json there."""
    for name, st in status.items():
        target = store.join(dest, sae_files.EXPORT, name)
        if st["status"] == "done":
            publish(os.path.join(workdir, name), target, export_to=target)
        else:
            store.write_json(store.join(target, pack.FAILED), st)
