"""Stage 4: train one sparse autoencoder on the activation shards.

Reads <out>/acts (manifest + Parquet shards), and through its eval (mono.metrics)
<out>/tokens/val (the eval contexts) and <out>/lm (the LM the eval splices the SAE into).
Writes, through mono.metrics, <out>/acts/mean.json once per activation dataset
(`acts_mean`: the training rows' mean activation, cached), and under `workdir`, a local
directory, its checkpoint, export, metrics and density plot (layout: mono.sae_files).

Training (paper; DESIGN.md "SAE"): `Trainer` steps (Adam with per-feature step counts,
decoder gradient projection, renormalisation every step) on batches that `ActsReader`
streams from the shards in one order seeded by cfg.seed alone, so every point of an
l1 x lr grid trains on the same batches. n_steps = 0 means one pass without replacement
(rows // batch_size, the remainder dropped, as the seed). A larger n_steps repeats the data
in further reshuffled passes, with a warning: the paper trains without replacement and
reports that repeated data kills features. b_dec starts at the geometric median of the
first `geom_median_samples` rows of that same stream (paper; the seed skipped it), so the
init too is identical across a sweep and costs one window read.

Resampling (paper appendix; mono.resample): a window opens `dead_window` steps before each
step in `resample_at`, but never before the previous resample (`SaeConfig.window_starts`:
one window per pending resample; a window longer than the gap between two resamples is cut
short, with a warning, instead of overlapping the previous one); right after that step (and
after its eval, so the metrics describe the trained weights), every feature that did not
fire on any training batch in the window is resampled from `resample_inputs` fresh rows of
`source` (at most the dataset's rows). A resample step equal to the run's last step is
skipped (its fresh features would go untrained into the export); a resumed, longer run
performs it first. Resample steps at or past the run's last step warn (`check_schedule`).
The default source draws uniform rows from the shards with a generator seeded by (seed,
step), so a resumed run draws the same rows; a sweep passes its `resample.SharedDraw`, one
draw per step seeded by (seed, step) and shared by every trial. Right after a resample,
reconstructions spike (the new encoder rows fire hard on outlier inputs: the paper's "loss
spikes"); they settle within ~100 steps.

Eval (mono.metrics), every `eval_interval` steps and at the end, on a fixed held-out set of
val contexts (`EvalSet`, the same for every trial of a sweep); its baselines (L_orig, L_zero,
L_mean against `acts_mean`) never change, so they are computed once and kept in the
checkpoint. Metrics (one flat dict per eval, JSON-ready): step, examples (step x
batch_size), the eval metrics of mono.metrics (l0, mse, l1, loss, explained_variance, L_*,
loss_recovered_mean (the HEADLINE), loss_recovered, nll_score, ce_increase, kl, *_eval,
eval_tokens); densities from the training stream (mono.density): dead / ultralow / dense
(features with density 0 / in (0, sae.ultralow_density) / above 1e-2) over the trailing
`density_window` rows (window_rows of them: resolution 1 / rows), the same counts since the
previous eval (*_since_eval, since_eval_rows: eval_interval x batch_size rows; a resample in
between counts its new features' firing); n_resampled (total), samples_per_s (training
only), train_loss / train_mse / train_l0 (means over the steps since the last eval), eval_s
and wall_s.

Resume: `train` continues from `resume_from`, or from workdir/checkpoint when it exists. The
checkpoint holds everything the loop depends on (weights, Adam state, reader position,
resampling RNG, the fire counts and masks), so N steps straight and N/2 + resume + N/2 give
bit-identical weights (tests/test_train_sae.py, across resamplings). Checkpoints are written
at every eval, every `checkpoint_interval` steps, after every resample and at the end. A checkpoint
from another dictionary size, input width, SAE setting or activation dataset is refused.
Test-only fault switch: MONO_TEST_SAE_FAIL_AT="<step>:<marker path>" raises RuntimeError
once, right after that step's update (before its eval/checkpoint), if the marker file does
not exist yet (it is created first), so a retried run resumes and passes.

Limits: float32 only; workdir must be a local path (checkpoints rename directories); one
process, one device; the eval holds its cache on the training device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor
from tqdm import tqdm

from mono import store
from mono.acts import IDENTITY_KEYS, lm_checksum
from mono.config import Config, SaeConfig
from mono.density import FireCounts, block_steps
from mono.density import counts as density_counts
from mono.errors import UserError
from mono.metrics import EvalSet, acts_mean, density_histogram
from mono.reader import ActsReader, LocalShardSource, check_shards, local_shards, shard_list
from mono.resample import ResampleSource, resample, source_at
from mono.sae import SparseAutoencoder, Trainer
from mono.sae_files import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    DENSITY,
    DENSITY_PNG,
    HISTORY,
    METRICS,
    SAE_WEIGHTS,
    STATE,
    TRAINER_STATE,
    check_resumable,
    export,
    latest_checkpoint,
    load_weights,
    read_checkpoint,
    write_dir_atomic,
)

logger = logging.getLogger(__name__)

FAIL_AT_ENV = "MONO_TEST_SAE_FAIL_AT"
# Domain tags for np.random.default_rng([seed, tag, ...]): unrelated streams (mono.metrics's
# eval contexts use 13).
_RESAMPLE, _SOURCE = 11, 12


# --- inputs ----------------------------------------------------------------------------


def acts_checksum(manifest: dict) -> str:
    """sha256 over what defines an activation dataset (not where or how fast it was written)."""
    body = {k: manifest.get(k) for k in (*IDENTITY_KEYS, "H", "rows")}
    body["files"] = [(f["name"], f["rows"]) for f in manifest["files"]]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_inputs(cfg: Config) -> dict:
    """Validate the shards (manifest, footers), the LM and the val split before training
    (UserError naming the file or value): returns
    {H, rows, acts_sha256, lm_sha256, ctx_len, manifest, mean} (mean: `acts_mean`, computed
    here once per dataset)."""
    manifest = store.acts_manifest(cfg.out)
    H, where = manifest["H"], store.Layout(cfg.out).acts_manifest
    if H != cfg.lm.d_mlp:
        raise UserError(f"activation shards in {where} are {H} wide, but lm.d_mlp is "
                        f"{cfg.lm.d_mlp}: the SAE input width must match the LM's MLP")
    lm_sha = lm_checksum(cfg.out)
    if manifest["lm_sha256"] != lm_sha:
        raise UserError(f"activation shards in {where} come from another LM (sha256 "
                        f"{manifest['lm_sha256'][:12]}) than {store.Layout(cfg.out).lm} "
                        f"({lm_sha[:12]}): rerun collect_acts")
    rows = manifest["rows"]
    if rows < cfg.sae.batch_size:
        raise UserError(f"{rows} activation rows in {where} make no batch of "
                        f"sae.batch_size={cfg.sae.batch_size}")
    check_shards(shard_list(cfg.out))
    tm = store.tokens_manifest(cfg.out)
    if tm["splits"]["val"]["rows"] == 0:
        raise UserError(f"no val contexts in {store.Layout(cfg.out).tokens('val')}: the eval "
                        f"needs held-out contexts (raise tokens.val_fraction)")
    inputs = {"H": H, "rows": rows, "acts_sha256": acts_checksum(manifest), "lm_sha256": lm_sha,
              "ctx_len": tm["ctx_len"], "manifest": manifest}
    return inputs | {"mean": acts_mean(cfg, inputs)}


def plan_steps(sc: SaeConfig, rows: int) -> tuple[int, int]:
    """(steps, reader epochs): n_steps = 0 is one pass (rows // batch_size); more steps than
    one pass holds read the data again in further passes (epochs = 0: endless)."""
    per_pass = rows // sc.batch_size
    steps = sc.n_steps or per_pass
    if steps <= per_pass:
        return steps, 1
    logger.warning("sae.n_steps=%d needs %.2f passes over the %d activation rows: rows repeat "
                   "(the paper trains on each row once)", steps, steps / per_pass, rows)
    return steps, 0


def check_schedule(sc: SaeConfig, n_steps: int) -> list[str]:
    """Warn (and return the warnings) about a resampling schedule that will not run as
    written: windows cut short by the previous resample, resample steps at or past the
    run's last step (they never happen in this run)."""
    steps, out = sorted(sc.resample_at), []
    short = [s for s, w in zip(steps, sc.window_starts)
             if s - w < sc.dead_window]
    if short:
        out.append(f"sae.dead_window={sc.dead_window} is longer than the gap before the "
                   f"resamples at {short}: their windows start at the previous resample "
                   f"(or step 0)")
    late = [s for s in steps if s >= n_steps]
    if late:
        out.append(f"sae.resample_at steps {late} are at or past this run's last step "
                   f"{n_steps}: they will not run (raise sae.n_steps or collect more "
                   f"activation rows: {n_steps} steps x sae.batch_size {sc.batch_size})")
    for message in out:
        logger.warning(message)
    return out


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("sae.device='cuda' but CUDA is not available")
    return torch.device(name)


class _SeededSource:
    """The default ResampleSource: uniform shard rows, drawn by a generator seeded by
    (seed, step) so a resumed run draws what a straight one drew. keep_last: keep the last
    draw, so the members of a pack (mono.pack), which share one source, read it once."""

    def __init__(self, out: str, seed: int, keep_last: bool = False):
        self.out, self.seed, self.step, self._src = out, seed, 0, None
        self.keep_last = keep_last
        self._last: tuple[tuple[int, int], np.ndarray] | None = None

    def at_step(self, step: int) -> _SeededSource:
        self.step = step
        return self

    def sample(self, n: int) -> np.ndarray:
        if self._last is not None and self._last[0] == (self.step, n):
            return self._last[1]
        if self._src is None:  # footers are read only when a resample happens
            self._src = LocalShardSource(self.out, seed=self.seed)
        x = self._src.sample(n, seed=[self.seed, _SOURCE, self.step])
        if self.keep_last:
            self._last = ((self.step, n), x)
        return x


# --- the training run ------------------------------------------------------------------


def _fail_switch() -> tuple[int, str] | None:
    spec = os.environ.get(FAIL_AT_ENV, "")
    if not spec:
        return None
    step, _, marker = spec.partition(":")
    if not step.isdigit() or not marker:
        raise ValueError(f"{FAIL_AT_ENV} must be '<step>:<marker path>', got {spec!r}")
    return int(step), marker


class SaeRun:
    """One SAE training run: its model, trainer, reader position and bookkeeping."""

    def __init__(self, cfg: Config, workdir: str, source: ResampleSource | None,
                 resume_from: str | None, evalset: EvalSet | None = None,
                 inputs: dict | None = None, shards: list[str] | str | None = None,
                 b_dec: Tensor | None = None):
        """evalset: an EvalSet to share (mono.pack: one LM and eval cache for a pack);
        inputs: `check_inputs(cfg)` done already for the same data (a pack's first member),
        so K members check the shards, LM and mean once; shards: another run's `shards`
        over the same data (skips `local_shards`); b_dec: the initial b_dec of a fresh run
        on the same data, seed and sample settings, copied instead of computed (ignored
        when this run resumes from a checkpoint)."""
        if store.is_uri(workdir):
            raise ValueError(f"the SAE workdir must be a local path, got {workdir!r}")
        self.cfg, self.workdir, sc = cfg, workdir, cfg.sae
        self.shards: list[str] | str | None = shards   # else set by the first _reader
        self.inputs = inputs if inputs is not None else check_inputs(cfg)
        self.device = pick_device(sc.device)
        self.n_steps, self.epochs = plan_steps(sc, self.inputs["rows"])
        # A checkpoint is read and checked before the (slow) LM and eval-set set-up.
        ckpt_path = resume_from or latest_checkpoint(workdir)
        ckpt = read_checkpoint(ckpt_path) if ckpt_path is not None else None
        if ckpt is not None:
            check_resumable(ckpt_path, ckpt[0], cfg, self.inputs)
        self.lm = evalset.lm if evalset is not None else store.load_lm(
            cfg.out, expect=cfg.lm, device=str(self.device))
        # Init seeded by (seed, F): with the seed alone, every size's first rows would be the
        # smaller sizes' initial dictionary, and feature splitting would match inits.
        init_seed = int(np.random.SeedSequence([cfg.seed, sc.n_features]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(init_seed)
        self.sae = SparseAutoencoder(self.inputs["H"], sc.n_features, sc.l1_coeff,
                                     device=self.device, generator=gen)
        self.trainer = Trainer(self.sae, sc.lr)
        self.source = source if source is not None else _SeededSource(cfg.out, cfg.seed)
        self.rng = np.random.default_rng([cfg.seed, _RESAMPLE])
        self.step, self.n_resampled, self.history = 0, 0, []
        self.wall, self.t_start = 0.0, time.perf_counter()  # wall_s: this run's, all attempts
        self.reader_state: dict | None = None
        self.density = np.zeros(sc.n_features)  # trailing-window densities of the last eval
        self.cached_baseline: dict | None = None
        # Feature firing, folded from trainer.fire_counts at every boundary (window start,
        # eval, resample, density block): counted since the last eval and over the trailing
        # density window (mono.density), and the mask since the open resample window opened
        # (-> the dead features); `last_resample` makes a resample at the final step of a
        # shorter run happen on resume instead (resample_due).
        self.fires = FireCounts(sc.n_features, block_steps(sc.density_window, sc.batch_size),
                                self.device)
        self.window: Tensor | None = None
        self.last_resample = 0
        self.fresh = ckpt is None   # no checkpoint: the weights are the init's until a step
        if ckpt is not None:
            self._restore(ckpt_path, *ckpt)
        elif b_dec is not None:
            with torch.no_grad():
                self.sae.b_dec.copy_(b_dec)
        else:
            self._init_b_dec()
        self.evalset = evalset or EvalSet(cfg, self.lm, self.device, sc.n_features)
        if self.cached_baseline is not None:
            self.evalset.baseline = self.cached_baseline
        # Windows open for every resample step, even past n_steps: a later resume with more
        # steps then finds the same masks a straight run has.
        self.resample_at = set(sc.resample_at)
        self.window_at = set(sc.window_starts)
        steps = sorted(sc.resample_at)
        check_schedule(sc, self.n_steps)
        self.resample_inputs = min(sc.resample_inputs, self.inputs["rows"])
        if self.resample_inputs < sc.resample_inputs and steps and steps[0] < self.n_steps:
            logger.warning("sae.resample_inputs=%d > the %d activation rows: scoring all of "
                           "them at each resample", sc.resample_inputs, self.inputs["rows"])
        self.fail_at = _fail_switch()

    def _reader(self, batch_size: int, **kw) -> ActsReader:
        if self.shards is None:  # remote shards: read from this node's cache when they fit
            self.shards = local_shards(self.cfg.out) or self.cfg.out
        return ActsReader(self.shards, batch_size, seed=self.cfg.seed,
                          shuffle_buffer=self.cfg.sae.shuffle_buffer, **kw)

    def _init_b_dec(self) -> None:
        n = min(self.cfg.sae.geom_median_samples, self.inputs["rows"])
        sample = next(iter(self._reader(n, epochs=1, max_rows=n)))               # (n, H)
        if not bool(torch.isfinite(sample).all()):
            raise ValueError(f"the first {n} rows of the training stream over "
                             f"{store.Layout(self.cfg.out).acts} hold NaN/Inf values: the "
                             f"activation shards are corrupt; recollect them")
        self.sae.init_b_dec_(sample.to(self.device))

    def _restore(self, path: str, state: dict, weights: dict[str, Tensor],
                 trainer: dict[str, Tensor]) -> None:
        load_weights(self.sae, {k: v.to(self.device) for k, v in weights.items()}, path)
        try:
            self.trainer.load_state_dict({k: v.to(self.device) for k, v in trainer.items()})
        except (KeyError, ValueError) as err:
            raise ValueError(f"SAE checkpoint {path}: trainer state does not fit: {err}") \
                from err
        if state["step"] > self.n_steps:
            raise ValueError(f"checkpoint {path} is at step {state['step']}, past this run's "
                             f"{self.n_steps} steps")
        self.step, self.n_resampled = state["step"], state["n_resampled"]
        self.history, self.reader_state = state["history"], state["reader"]
        self.wall = state["wall_s"]
        self.rng.bit_generator.state = state["rng"]
        self.cached_baseline = state["baseline"]
        self.density = state["density"]
        self.last_resample = state["last_resample"]
        try:
            self.fires.load_state_dict({k[len("run."):]: v.to(self.device)
                                        for k, v in trainer.items() if k.startswith("run.")})
            if state["window_open"]:
                self.window = trainer["run.window"].to(self.device)
        except (KeyError, RuntimeError, ValueError) as err:
            raise ValueError(f"SAE checkpoint {path}: firing masks missing or misshapen: "
                             f"{err}") from err
        logger.info("SAE: resumed from %s at step %d of %d", path, self.step, self.n_steps)

    def checkpoint(self) -> str:
        """Write workdir/checkpoint for the current step; returns its path."""
        window = self.window if self.window is not None else torch.zeros(
            self.sae.n_features, dtype=torch.bool, device=self.device)
        fires = {f"run.{k}": v for k, v in self.fires.state_dict().items()}
        trainer_state = {k: v.detach().cpu().contiguous() for k, v in (
            self.trainer.state_dict() | fires | {"run.window": window}).items()}
        weights = {k: v.detach().cpu().contiguous() for k, v in self.sae.state_dict().items()}
        state = {
            "format": CHECKPOINT_FORMAT, "step": self.step, "n_steps": self.n_steps,
            "reader": self.reader_state, "rng": self.rng.bit_generator.state,
            "n_resampled": self.n_resampled, "history": self.history,
            "last_resample": self.last_resample, "window_open": self.window is not None,
            "wall_s": self.wall + time.perf_counter() - self.t_start,
            "baseline": self.evalset.baseline,
            "H": self.inputs["H"], "seed": self.cfg.seed, "acts_sha256":
            self.inputs["acts_sha256"], "sae": dataclasses.asdict(self.cfg.sae),
        }
        buf = io.BytesIO()
        np.save(buf, self.density)
        path = os.path.join(self.workdir, CHECKPOINT)
        write_dir_atomic(path, {
            SAE_WEIGHTS: safetensors.torch.save(weights),
            TRAINER_STATE: safetensors.torch.save(trainer_state),
            STATE: json.dumps(state).encode(), DENSITY: buf.getvalue()})
        return path

    def _check_finite(self, loss: Tensor, x: Tensor, rows_before: int) -> None:
        if bool(torch.isfinite(loss)):
            return
        where = (f"step {self.step} (rows {rows_before}..{rows_before + len(x)} of the "
                 f"reader's stream over {store.Layout(self.cfg.out).acts})")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"activation batch at {where} holds NaN/Inf values: the "
                             f"activation shards are corrupt; recollect them")
        raise FloatingPointError(f"SAE loss is {float(loss)} at {where}: training diverged "
                                 f"(try a lower sae.lr than {self.cfg.sae.lr})")

    def _maybe_fail(self) -> None:
        if self.fail_at is None or self.fail_at[0] != self.step:
            return
        marker = self.fail_at[1]
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        os.close(fd)
        raise RuntimeError(f"injected failure ({FAIL_AT_ENV}) at step {self.step}")

    def _fold(self) -> None:
        """Move trainer.fire_counts into the density counts and the window mask, then
        reset it."""
        self.fires.add(self.trainer.fire_counts)
        if self.window is not None:
            self.window |= self.trainer.fired
        self.trainer.reset_fired()

    def _open_window(self) -> None:
        self._fold()
        self.window = torch.zeros(self.sae.n_features, dtype=torch.bool, device=self.device)

    def resample_due(self) -> bool:
        """A resample step not done yet; never the last step (its new features would go
        untrained into the export: a longer resumed run does it first instead)."""
        return (self.step in self.resample_at and self.step < self.n_steps
                and self.last_resample != self.step)

    def _resample(self) -> None:
        """Resample the features that did not fire since the window opened (paper)."""
        self._fold()
        assert self.window is not None, f"no dead window open at resample step {self.step}"
        dead = ~self.window
        res = resample(self.trainer, dead, source_at(self.source, self.step),
                       self.resample_inputs, self.rng, self.cfg.sae.batch_size)
        self.n_resampled += res.n_resampled
        self.window, self.last_resample = None, self.step
        logger.info("SAE step %d: resampled %d of %d features (total %d)", self.step,
                    res.n_resampled, self.sae.n_features, self.n_resampled)

    def eval(self, train: dict, seconds: float) -> dict:
        """Eval the current weights; returns the metrics (appended to the history).

        train: sums of the training stats since the last eval ("steps": how many), seconds:
        the training time they took.
        """
        t0, ultralow = time.perf_counter(), self.cfg.sae.ultralow_density
        metrics, _ = self.evalset.evaluate(self.sae, self.inputs["mean"], ultralow)
        self._fold()
        window, since = self.fires.window(), self.fires.take_since_eval()
        self.density = window.density
        steps, bs = train["steps"], self.cfg.sae.batch_size
        out = {"step": self.step, "examples": self.step * bs, **metrics,
               **density_counts(window.density, ultralow), "window_rows": window.rows,
               **{f"{k}_since_eval": v for k, v in density_counts(since.density,
                                                                 ultralow).items()},
               "since_eval_rows": since.rows,
               "n_resampled": self.n_resampled,
               "samples_per_s": steps * bs / seconds if seconds else 0.0,
               **{f"train_{k}": float(v) / steps for k, v in train.items()
                  if k != "steps" and steps},
               "eval_s": time.perf_counter() - t0,
               "wall_s": self.wall + time.perf_counter() - self.t_start}
        self.history.append(out)
        logger.info("SAE step %d/%d: L0 %.1f, loss recovered %.3f vs mean ablation (%.3f vs "
                    "zero), CE +%.4f nats, KL %.4f, explained var %.3f, dead %d / ultralow %d "
                    "/ dense %d of %d over %d training rows, %.0f samples/s", self.step,
                    self.n_steps, out["l0"], out["loss_recovered_mean"],
                    out["loss_recovered"], out["ce_increase"], out["kl"],
                    out["explained_variance"], out["dead"], out["ultralow"], out["dense"],
                    self.sae.n_features, window.rows, out["samples_per_s"])
        return out

    def fit(self, on_eval: Callable[[dict, str], None] | None,
            on_report: Callable[[dict, str | None], None] | None = None) -> dict:
        """Train to n_steps (from wherever the run stands); returns the last eval's metrics.

        After each step: the fault switch; the eval (on eval steps, before a resample of the
        same step, so metrics describe the trained weights); the resample; the checkpoint
        (+ on_eval) of the state after all of it; `on_report` with the progress scalars
        every report_interval steps and at every checkpoint (`progress`). The loop is
        `begin`, then `train_step` + `after_step` per batch, then `end`: `mono.pack` drives
        several runs through the same hooks from one reader.
        """
        reader = self.reader()
        self.begin(reader, on_eval, on_report)
        for x in reader if self.step < self.n_steps else ():
            self.train_step(x)
            self.after_step(reader)
            if self.step == self.n_steps:
                break
        return self.end()

    def reader(self) -> ActsReader:
        """The training stream, positioned where this run stands."""
        sc = self.cfg.sae
        return self._reader(sc.batch_size, epochs=self.epochs, max_rows=self.n_steps *
                            sc.batch_size, device=str(self.device), state=self.reader_state)

    def begin(self, reader: ActsReader, on_eval=None, on_report=None) -> None:
        """Set up a `fit` from the current step: callbacks, accumulators, progress bar."""
        if self.resample_due():  # the checkpoint ended a shorter run right before a resample
            self._resample()
        self.on_eval, self.on_report = on_eval, on_report
        self.train, self.t_train, self.rows_before = {"steps": 0}, 0.0, reader.rows
        self.since_report: dict = {"steps": 0}
        self.bar = tqdm(total=self.n_steps, initial=self.step, unit="step", desc="sae",
                        disable=None)
        self.t0 = time.perf_counter()

    def before_step(self) -> None:
        """Open the dead window that starts at this step, if one does."""
        if self.step in self.window_at:
            self._open_window()

    def train_step(self, x: Tensor) -> None:
        """One training step on batch x and its bookkeeping."""
        self.before_step()
        self.record(self.trainer.step(x), x)

    def record(self, stats, x: Tensor) -> None:
        """Count the step that produced `stats` on batch x (NaN/Inf checked here)."""
        self.step += 1
        self._check_finite(stats.loss, x, self.rows_before)
        self.fires.add_rows(len(x))
        if self.step % self.fires.block_steps == 0:  # a density block ends
            self._fold()
            self.fires.advance()
        for acc in (self.train, self.since_report):
            for k in ("loss", "mse", "l0"):
                acc[k] = acc.get(k, 0.0) + getattr(stats, k)
            acc["steps"] += 1

    def after_step(self, reader: ActsReader) -> None:
        """Fault switch, eval, resample, checkpoint and reports due after this step."""
        sc = self.cfg.sae
        self.reader_state, self.rows_before = reader.state(), reader.rows
        self._maybe_fail()
        self.bar.update(1)
        evaluate = self.step % sc.eval_interval == 0 or self.step == self.n_steps
        if evaluate or self.resample_due() or self.step % sc.checkpoint_interval == 0:
            self.t_train += time.perf_counter() - self.t0
            # before the eval and the resample reset the firing masks
            progress = self.progress() if self.on_report is not None else None
            metrics = self.eval(self.train, self.t_train) if evaluate else None
            if self.resample_due():
                self._resample()
            path = self.checkpoint()
            if metrics is not None:
                if self.on_eval is not None:
                    self.on_eval(metrics, path)
                self.bar.set_postfix(l0=f"{metrics['l0']:.1f}",
                                     rec=f"{metrics['loss_recovered_mean']:.3f}")
                self.train, self.t_train = {"steps": 0}, 0.0
            self._report(metrics, path, progress)
            self.t0 = time.perf_counter()
        elif sc.report_interval and self.step % sc.report_interval == 0:
            self._report(None, None, self.progress() if self.on_report else None)

    def end(self) -> dict:
        """Close a `fit`: the final eval if the run resumed at its end; its metrics."""
        self.bar.close()
        if self.step != self.n_steps:
            raise RuntimeError(f"the activation stream ended at step {self.step} of "
                               f"{self.n_steps}")
        if not self.history or self.history[-1]["step"] != self.step:
            # resumed at the end from a non-eval checkpoint
            metrics = self.eval(self.train, self.t_train)
            path = self.checkpoint()
            if self.on_eval is not None:
                self.on_eval(metrics, path)
            self._report(metrics, path, self.progress() if self.on_report else None)
        return self.history[-1]

    def progress(self) -> dict:
        """The cheap scalars of a report: step, examples, train_loss / train_mse /
        train_l0 (means over the steps since the last report) and dead_fraction (features
        that fired on no training batch since the last eval, a fraction of F)."""
        acc, n = self.since_report, self.since_report["steps"]
        out = {"step": self.step, "examples": self.step * self.cfg.sae.batch_size}
        out |= {f"train_{k}": float(acc[k]) / n for k in ("loss", "mse", "l0") if n}
        fired = (self.fires.since_eval > 0) | self.trainer.fired
        out["dead_fraction"] = float((~fired).sum()) / self.sae.n_features
        return out

    def _report(self, metrics: dict | None, path: str | None, progress: dict | None) -> None:
        if self.on_report is None:
            return
        self.since_report = {"steps": 0}
        self.on_report({**(metrics or {}), **progress}, path)

    def finish(self, metrics: dict) -> dict:
        """Export, metrics.json, history.json and the density histogram."""
        export(self.workdir, self.cfg, self.sae, self.inputs, metrics)
        store.write_json(os.path.join(self.workdir, METRICS), metrics)
        store.write_json(os.path.join(self.workdir, HISTORY), self.history)
        density_histogram(self.density, os.path.join(self.workdir, DENSITY_PNG),
                          f"step {metrics['step']}: L0 {metrics['l0']:.1f}, loss recovered "
                          f"{metrics['loss_recovered_mean']:.3f} (vs mean ablation)",
                          metrics["window_rows"], self.cfg.sae.ultralow_density)
        return metrics


def train(cfg: Config, workdir: str, *, source: ResampleSource | None = None,
          resume_from: str | None = None,
          on_eval: Callable[[dict, str], None] | None = None,
          on_report: Callable[[dict, str | None], None] | None = None) -> dict:
    """Train one SAE (cfg.sae) on <cfg.out>/acts into `workdir` (module docstring); returns
    the final metrics.

    source: resampling rows (default: uniform shard rows seeded by (seed, step)).
    resume_from: a checkpoint dir; None = workdir/checkpoint if there is one, else fresh.
    on_eval(metrics, checkpoint_dir): after every eval, with a complete checkpoint of that
    step in checkpoint_dir (replaced by the next checkpoint: persist it before returning).
    on_report(result, checkpoint_dir or None): every sae.report_interval steps the progress
    scalars (`SaeRun.progress`), and at every checkpoint those + the eval's metrics when it
    was an eval step, with the checkpoint dir (what the sweep reports to Tune).
    """
    os.makedirs(workdir, exist_ok=True)
    sae_run = SaeRun(cfg, workdir, source, resume_from)
    logger.info("SAE: %d features on H=%d, l1_coeff %g, lr %g, batch %d, %d steps from step "
                "%d, %s, eval on %d tokens", cfg.sae.n_features, sae_run.inputs["H"],
                cfg.sae.l1_coeff, cfg.sae.lr, cfg.sae.batch_size, sae_run.n_steps,
                sae_run.step, sae_run.device, sae_run.evalset.n_tokens)
    return sae_run.finish(sae_run.fit(on_eval, on_report))


def run(cfg: Config) -> dict:
    """Single SAE run (no Tune) into <cfg.out>/sae_single/; returns the final metrics."""
    if store.is_uri(cfg.out):
        raise ValueError(f"train_sae.run needs a local --out, got {cfg.out!r}; the sweep "
                         f"(ray_jobs.sweep_sae) trains against cluster storage")
    return train(cfg, store.join(cfg.out, "sae_single"))
