"""Stage 4: a pack of SAEs trained on one shared activation stream (a layer above train_sae).

Reads what train_sae reads (<out>/acts, the val split, <out>/lm). Writes, under `workdir`
(local), one train_sae workdir per member, <workdir>/<name>/ (checkpoint/, sae/ with
sae_lens/, metrics.json, history.json, density.png), plus <name>/failed.json for a member
that diverged.

Why: reading, not the SAE step, sets a sweep's pace (DESIGN.md "Ray wiring": ~150 k rows/s
per CPU core against 1.86 M samples/s for one paper-shaped SAE on an H100). K members that
differ only in l1_coeff and lr train on the same seeded stream anyway, so a pack reads and
decodes each batch once (one `ActsReader`) and moves it to the device once; every member
then steps on it. Members share the LM and the eval cache (`EvalSet`), the input check, the
shard list, the initial b_dec (fresh members: one geometric-median sample, not K) and the
resampling source; each keeps its own `SaeRun`: weights, FeatureAdam state, dead windows,
resampling RNG, metrics, checkpoints and export, exactly as if it trained alone.

The step: on CPU each member takes train_sae's own step (`Trainer.step`: dense or sparse by
its own f's density), so a pack's members are bit-identical to separate runs. Where every
member has the same shapes and sits on a CUDA device (or `batched=True`, as the tests do on
CPU), `batched_grads` computes all K members' gradients as one batched computation over
stacked weights (baddbmm / bmm; the members' parameters are views into the stacks, so
every other piece of their code, resampling included, writes the stacks in place); each
member then applies its own projection, FeatureAdam update and renormalisation.

Resume: each member resumes from its own checkpoint. Members may stand at different steps
(a pack killed between two members' checkpoint writes, or a member added later): the
stream starts at the earliest and the others skip batches until it reaches their step, so
a resumed pack ends where an uninterrupted one does. Divergence: a member whose loss turns
NaN/Inf (FloatingPointError from train_sae) is marked failed (failed.json) and dropped; its
siblings go on, and a resumed pack leaves it failed. Corrupt input (NaN in a batch) stops
the whole pack: it is every member's input.

Shapes: K members, N rows of a batch, H input width, F features.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from mono import store
from mono.config import Config
from mono.metrics import EvalSet
from mono.resample import ResampleSource
from mono.sae import StepStats
from mono.train_sae import SaeRun, _SeededSource

logger = logging.getLogger(__name__)

FAILED = "failed.json"
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
PACKABLE = frozenset({"l1_coeff", "lr"})
"""SaeConfig fields pack members may differ in (everything else shapes the stream or the
arrays)."""


def member_name(params: dict) -> str:
    """l1_<l1>_lr_<lr>: a member's directory name."""
    return "_".join(f"{'l1' if k == 'l1_coeff' else k}_{v:g}" for k, v in sorted(
        params.items(), key=lambda kv: (kv[0] != "l1_coeff", kv[0])))


def member_cfg(cfg: Config, params: dict) -> Config:
    extra = set(params) - PACKABLE
    if extra:
        raise ValueError(f"pack members may differ only in {sorted(PACKABLE)}, got "
                         f"{sorted(extra)}")
    return replace(cfg, sae=replace(cfg.sae, **params))


@torch.no_grad()
def batched_grads(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                  l1_coeff: Tensor, x: Tensor) -> tuple[dict[str, Tensor], list[StepStats],
                                                        Tensor]:
    """Loss gradients of K SAEs on one batch as batched GEMMs (train_sae's dense backward,
    `Trainer._dense_backward`, with a leading K axis).

    W_enc (K, H, F), b_enc (K, F), W_dec (K, F, H), b_dec (K, H), l1_coeff (K,), x (N, H)
    -> (grads shaped like the stacks, K StepStats, fire counts (K, F)).
    """
    n, h = x.shape
    x = x.to(W_enc)
    xc = x[None] - b_dec[:, None, :]                                         # (K, N, H)
    f = torch.baddbmm(b_enc[:, None, :], xc, W_enc).relu_()                  # (K, N, F)
    e = torch.baddbmm(b_dec[:, None, :], f, W_dec).sub_(x)                   # (K, N, H)
    counts = (f > 0).sum(dim=1).to(torch.float64)                            # (K, F)
    mse = e.pow(2).sum(dim=(1, 2)) / (n * h)                                 # (K,)
    l1 = f.sum(dim=(1, 2)) / n                                               # (K,)
    l0 = counts.sum(dim=1).to(x.dtype) / n                                   # (K,)
    e.mul_(2.0 / (n * h))                                                    # dloss/dx_hat
    g_W_dec = torch.bmm(f.transpose(1, 2), e)                                # (K, F, H)
    g = torch.baddbmm((l1_coeff / n)[:, None, None].to(x.dtype), e,
                      W_dec.transpose(1, 2))                                 # (K, N, F)
    g.mul_(f > 0)                                                            # ReLU's backward
    g_W_enc = torch.bmm(xc.transpose(1, 2), g)                               # (K, H, F)
    g_b_enc = g.sum(dim=1)                                                   # (K, F)
    # b_dec enters twice: + through x_hat, - through x_bar = x - b_dec
    g_b_dec = e.sum(dim=1) - torch.bmm(W_enc, g_b_enc[:, :, None]).squeeze(2)  # (K, H)
    stats = [StepStats(mse[k] + l1_coeff[k] * l1[k], mse[k], l1[k], l0[k])
             for k in range(len(mse))]
    grads = {"W_enc": g_W_enc, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}
    return grads, stats, counts


class Pack:
    """K `SaeRun`s on one stream (module docstring). `fit()` trains every live member to
    n_steps; `finish()` exports each one; `status` says done / failed per member."""

    def __init__(self, cfg: Config, members: list[dict], workdir: str, *,
                 source: ResampleSource | None = None, batched: bool | None = None,
                 resume_from: str | None = None):
        """resume_from: a dir of <name>/ checkpoints (or <name>/failed.json), as
        `pack_checkpoint` assembles them; None = each member's workdir checkpoint."""
        if not members:
            raise ValueError("a pack needs at least one member")
        names = [member_name(m) for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"pack members repeat: {names}")
        self.cfg, self.workdir = cfg, workdir
        # one resampling source for all (its draws depend on the step alone)
        source = source if source is not None else _SeededSource(cfg.out, cfg.seed,
                                                                 keep_last=True)
        self.runs: dict[str, SaeRun] = {}
        self.status: dict[str, dict] = {}
        evalset: EvalSet | None = None
        inputs: dict | None = None   # members differ in l1/lr only: one input check for all
        # ... and not in seed, sample size or shuffle buffer: one shard list, one initial
        # b_dec (the first fresh member's, cloned before any step) for all
        shards: list[str] | str | None = None
        b_dec: torch.Tensor | None = None
        for name, params in zip(names, members):
            member_dir = os.path.join(workdir, name)
            saved = os.path.join(resume_from, name) if resume_from else None
            failed = [f for f in (os.path.join(member_dir, FAILED),
                                  saved and os.path.join(saved, FAILED)) if f and os.path.exists(f)]
            if failed:
                self.status[name] = store.read_json(failed[0])
                os.makedirs(member_dir, exist_ok=True)
                store.write_json(os.path.join(member_dir, FAILED), self.status[name])
                logger.warning("pack: %s failed before (%s): left out", name,
                               self.status[name]["error"])
                continue
            if saved is not None and not os.path.isdir(saved):
                saved = None
            run = SaeRun(member_cfg(cfg, params), member_dir, source, saved, evalset, inputs,
                         shards, b_dec)
            evalset, inputs = run.evalset, run.inputs
            shards = shards if shards is not None else run.shards
            if b_dec is None and run.fresh:
                b_dec = run.sae.b_dec.detach().clone()
            self.runs[name] = run
        live = list(self.runs.values())
        same = live and len({(r.device, r.sae.n_features, r.sae.d_in) for r in live}) == 1
        self.batched = (same and live[0].device.type == "cuda") if batched is None else batched
        if self.batched and not same:
            raise ValueError("a batched pack needs members of one shape on one device")
        if self.batched:
            self._stack()

    def _stack(self) -> None:
        """Make the members' parameters views into (K, ...) stacks, for `batched_grads`."""
        runs = list(self.runs.values())
        self.stacks = {}
        for p in PARAMS:
            stack = torch.stack([getattr(r.sae, p).data for r in runs])
            for k, r in enumerate(runs):
                getattr(r.sae, p).data = stack[k]
            self.stacks[p] = stack
        self.l1 = torch.tensor([r.sae.l1_coeff for r in runs], device=stack.device,
                               dtype=stack.dtype)

    def fit(self, on_report: Callable[[str, dict, str | None], None] | None = None) -> None:
        """Train every live member to n_steps. on_report(name, result, checkpoint_dir)
        as train_sae's on_report, per member."""
        if not self.runs:
            return
        first = min(self.runs.values(), key=lambda r: r.step)
        reader = first.reader()    # the stream from the earliest member's position
        bs = self.cfg.sae.batch_size
        for name, run in self.runs.items():
            cb = None if on_report is None else (lambda res, path, n=name: on_report(n, res,
                                                                                        path))
            run.begin(reader, None, cb)
        n_steps = first.n_steps
        for x in reader if first.step < n_steps else ():
            at = reader.rows // bs - 1                  # the step this batch is (0-based)
            due = [(name, run) for name, run in self.runs.items()
                   if name not in self.status and run.step == at]
            if self.batched:
                self._batched_step(x, due)
            else:
                for name, run in due:
                    self._guarded(name, run.train_step, x)
            for name, run in due:
                if name not in self.status:
                    self._guarded(name, run.after_step, reader)
            if not self.live():
                break
            if at + 1 >= n_steps:
                break
        for name, run in self.runs.items():
            if name not in self.status:
                run.end()
        if not self.live():
            raise FloatingPointError(f"every member of the pack in {self.workdir} diverged: "
                                     f"{self.status}")

    def _batched_step(self, x: Tensor, due: list[tuple[str, SaeRun]]) -> None:
        for _, run in due:
            run.before_step()
        grads, stats, counts = batched_grads(*(self.stacks[p] for p in PARAMS), self.l1, x)
        index = {name: k for k, name in enumerate(self.runs)}
        for name, run in due:
            k = index[name]
            tr = run.trainer
            for p in PARAMS:
                tr.grads[p].copy_(grads[p][k])
            tr.fire_counts += counts[k]
            tr.apply_grads()   # Trainer.step after its compute_grads
            self._guarded(name, run.record, stats[k], x)

    def _guarded(self, name: str, fn, *args) -> None:
        """Run a member's hook; a FloatingPointError (its loss diverged) fails that member."""
        try:
            fn(*args)
        except FloatingPointError as err:
            run = self.runs[name]
            self.status[name] = {"status": "failed", "step": run.step, "error": str(err)}
            store.write_json(os.path.join(run.workdir, FAILED), self.status[name])
            run.bar.close()
            logger.error("pack: member %s diverged at step %d; %d members go on: %s", name,
                         run.step, len(self.live()), err)

    def live(self) -> list[str]:
        """Names of the members still training (not failed)."""
        return [n for n in self.runs if n not in self.status]

    def finish(self) -> dict[str, dict]:
        """Export every live member; returns name -> {"status": "done", "metrics", "dir"}
        or the failed status."""
        out = dict(self.status)
        for name in self.live():
            run = self.runs[name]
            out[name] = {"status": "done", "metrics": run.finish(run.history[-1]),
                         "dir": run.workdir}
        return out


def train_pack(cfg: Config, members: list[dict], workdir: str, *,
               source: ResampleSource | None = None, batched: bool | None = None,
               on_report: Callable[[str, dict, str | None], None] | None = None
               ) -> dict[str, dict]:
    """Train a pack of SAEs (members: SaeConfig overrides of l1_coeff / lr) into
    <workdir>/<member_name>/; returns name -> status (`Pack.finish`). Resumes from the
    members' checkpoints when there are."""
    os.makedirs(workdir, exist_ok=True)
    pack = Pack(cfg, members, workdir, source=source, batched=batched)
    logger.info("pack: %d members (%d live), %s step, in %s", len(members),
                len(pack.runs) - len(pack.status), "batched" if pack.batched else "per-SAE",
                workdir)
    pack.fit(on_report)
    return pack.finish()


def pack_checkpoint(dest: str, members: dict[str, str | None], workdir: str) -> str:
    """Assemble one checkpoint dir for a whole pack: dest/<name>/ = a copy of each member's
    checkpoint dir (members: name -> its path, None for a failed member, whose failed.json
    is copied instead). Returns dest."""
    os.makedirs(dest, exist_ok=True)
    for name, path in members.items():
        if path is not None:
            shutil.copytree(path, os.path.join(dest, name))
        else:
            os.makedirs(os.path.join(dest, name), exist_ok=True)
            shutil.copy(os.path.join(workdir, name, FAILED), os.path.join(dest, name, FAILED))
    return dest


def read_status(workdir: str, members: list[dict]) -> dict[str, str]:
    """name -> done | failed | unfinished, from a pack's files alone."""
    out = {}
    for m in members:
        d = os.path.join(workdir, member_name(m))
        if os.path.exists(os.path.join(d, FAILED)):
            out[member_name(m)] = "failed"
        elif os.path.exists(os.path.join(d, "metrics.json")):
            out[member_name(m)] = "done"
        else:
            out[member_name(m)] = "unfinished"
    return out


def pack_memory(cfg: Config, H: int) -> int:
    """Bytes one member adds on the device: weights, grads, Adam moments + scratch (6 x the
    2·H·F + F + H parameters, float32) and its batch activations f and dloss/df
    (2 x batch x F)."""
    F, N = cfg.sae.n_features, cfg.sae.batch_size
    return 4 * (6 * (2 * H * F + F + H) + 2 * N * F)
