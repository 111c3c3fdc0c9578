"""Configuration for every stage: frozen dataclasses and the presets tiny, demo and paper.

Stdlib only, so jobs, tests and Ray workers import it without torch or Ray. Each field's
attribute docstring is its `--help` text (see `mono.cli`). Never mutate a config: use
`dataclasses.replace`. `Config` bundles one section per stage; every stage's `run(cfg)` takes
the whole `Config` because stages read their predecessors' settings (the LM width, T, ...).

Numbers in the `paper` preset are the seed's (shehper/monosemantic) and the paper's
(Bricken et al. 2023); see shared/DESIGN.md and reference/seed_spec.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

DTYPES = ("float16", "bfloat16", "float32")


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{type(obj).__name__}.{name} must be positive, got {value!r}")


def _non_negative(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"{type(obj).__name__}.{name} must be >= 0, got {value!r}")


def _fraction(obj, name: str) -> None:
    value = getattr(obj, name)
    if not 0 < value < 1:
        raise ValueError(f"{type(obj).__name__}.{name} must be in (0, 1), got {value!r}")


def _choice(obj, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class TokensConfig:
    """Stage 1: corpus -> GPT-2 BPE token shards (one row per context window of T tokens)."""

    corpus: str = ""
    """Text source: '' for the embedded offline default, a file, a glob, a directory, a
    .parquet/.jsonl file with a text column (text and JSONL also .gz/.zst), a directory saved by
    `datasets` save_to_disk or a local Hugging Face dataset repo, or hf:NAME[:CONFIG] for a
    Hugging Face dataset."""
    text_column: str = "text"
    """Column holding the text in Parquet/JSONL/HF sources."""
    ctx_len: int = 1024
    """T: tokens per context window (the LM's context)."""
    val_fraction: float = 0.0005
    """Fraction of documents held out for validation (seed: 0.0005 of OpenWebText); of the
    token stream's contexts when the corpus is too few documents for that (token-level split)."""
    min_val_docs: int = 2
    """At least this many documents go to validation, so tiny corpora still get a val split."""
    max_docs: int = 0
    """Read at most this many documents (0 = all); handy for trying a huge corpus."""
    docs_per_block: int = 2048
    """Documents per Ray Data block: one tokenize task per block."""
    rows_per_shard: int = 16384
    """Context windows per Parquet shard (paper: 16384 x 1024 uint16 = 32 MiB per file)."""
    hf_split: str = "train"
    """Split read from a Hugging Face dataset."""

    def __post_init__(self):
        _positive(self, "ctx_len", "min_val_docs", "docs_per_block", "rows_per_shard")
        _non_negative(self, "max_docs")
        _fraction(self, "val_fraction")
        if self.ctx_len > 65535:
            raise ValueError(f"TokensConfig.ctx_len must be <= 65535, got {self.ctx_len}")


@dataclass(frozen=True)
class LmConfig:
    """Stage 2: the one-layer transformer (nanoGPT-style, as the seed)."""

    vocab_size: int = 50304
    """V: GPT-2's 50257 ids padded to a multiple of 64 (seed)."""
    n_layer: int = 1
    """Transformer blocks; the SAE reads the MLP of the last one."""
    d_model: int = 128
    """D: residual stream width."""
    n_head: int = 4
    """Attention heads (d_model must divide evenly)."""
    d_mlp: int = 512
    """H: MLP width, the SAE's input width."""
    block_size: int = 1024
    """Longest context the position embedding covers (>= tokens.ctx_len)."""

    def __post_init__(self):
        _positive(self, "vocab_size", "n_layer", "d_model", "n_head", "d_mlp", "block_size")
        if self.d_model % self.n_head:
            raise ValueError(
                f"LmConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if self.vocab_size < 50257:
            raise ValueError(
                f"LmConfig.vocab_size must cover GPT-2's 50257 ids, got {self.vocab_size}")


@dataclass(frozen=True)
class TrainLmConfig:
    """Stage 2: LM training (AdamW, warmup + cosine decay, as nanoGPT and the seed)."""

    max_iters: int = 200_000
    """Optimizer steps."""
    batch_size: int = 12
    """Contexts per micro-batch per worker."""
    grad_accum: int = 40
    """Micro-batches per step (seed: 12 x 1024 x 40 = 491,520 tokens/step)."""
    lr: float = 6e-4
    """Peak learning rate."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine decay."""
    warmup_iters: int = 2000
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on >= 2-D tensors only."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    eval_interval: int = 1000
    """Steps between validation-loss evaluations and checkpoints."""
    eval_iters: int = 200
    """Batches per validation-loss evaluation."""
    log_interval: int = 100
    """Steps between progress lines."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks); 1 on a laptop. 0 trains in the calling process without
    Ray Train (the tiny preset's smoke runs: Ray Train's start-up is ~15-20 s on 2 cores)."""
    use_gpu: bool = False
    """One GPU per Ray Train worker."""
    threads: int = 0
    """torch threads per rank (0 = every core of the node, split between its ranks;
    mono/threads.py: the weights' last bits depend on it)."""
    dtype: str = "auto"
    """Autocast dtype: auto (bf16 on CUDA GPUs that support it, float32 on CPU, where bf16
    autocast measured slower), bfloat16 or float32."""
    max_failures: int = 2
    """Ray Train restarts of a crashed run from its last checkpoint."""

    def __post_init__(self):
        _positive(self, "max_iters", "batch_size", "grad_accum", "lr", "eval_interval",
                  "eval_iters", "log_interval", "beta1", "beta2")
        _non_negative(self, "min_lr", "warmup_iters", "weight_decay", "grad_clip",
                      "max_failures", "num_workers", "threads")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise ValueError(f"TrainLmConfig betas must be < 1, got ({self.beta1}, {self.beta2})")
        _choice(self, "dtype", ("auto", "bfloat16", "float32"))
        if self.min_lr > self.lr:
            raise ValueError(f"TrainLmConfig.min_lr ({self.min_lr}) must be <= lr ({self.lr})")


@dataclass(frozen=True)
class ActsConfig:
    """Stage 3: LM MLP activations at sampled positions -> Parquet activation shards."""

    tokens_per_context: int = 200
    """Positions sampled without replacement per context (seed: 200 of 1024; paper: 250)."""
    n_contexts: int = 0
    """Train contexts to run: the first n of the token shards (0 = every context)."""
    batch_contexts: int = 8
    """Contexts per LM forward in an actor."""
    shard_contexts: int = 1024
    """Contexts per activation shard, part-{first ctx:09d}.parquet; fixed, so a rerun maps to
    the same names (paper: 1024 x 200 rows, ~210 MB fp16)."""
    row_group_rows: int = 4096
    """Parquet row-group size; the training reader mixes one row group from each of
    shuffle_buffer / row_group_rows shards (4 MB at H=512 fp16)."""
    dtype: str = "float16"
    """Stored activation dtype: float16, bfloat16 (uint16 bits) or float32."""
    compression: str = "zstd"
    """Parquet compression: zstd (level 1 over byte-stream-split floats) or none."""
    max_actors: int = 0
    """Largest actor pool (0 = one per GPU, or CPUs - 1 on CPU)."""
    cpus_per_actor: int = 1
    """Logical CPUs each actor reserves; it overlaps that many shard writes with the LM, so
    give GPU actors several (writing Parquet is the GPU node's bottleneck). Also its torch
    threads unless threads_per_actor says otherwise."""
    threads_per_actor: int = 0
    """torch threads per actor (0 = its cpus_per_actor; mono/threads.py)."""
    use_gpu: bool = False
    """Give each collection actor one GPU."""
    overwrite: bool = False
    """Replace shards written from a different LM or settings instead of refusing."""

    def __post_init__(self):
        _positive(self, "tokens_per_context", "batch_contexts", "shard_contexts",
                  "row_group_rows", "cpus_per_actor")
        _non_negative(self, "n_contexts", "max_actors", "threads_per_actor")
        _choice(self, "dtype", DTYPES)
        _choice(self, "compression", ("none", "zstd"))


@dataclass(frozen=True)
class SaeConfig:
    """Stage 4: one sparse autoencoder (Towards Monosemanticity) and its training."""

    n_features: int = 4096
    """F: dictionary size (paper A/1: 4096 = 8 x 512)."""
    l1_coeff: float = 1e-3
    """lambda on mean-over-batch sum |f| (MSE is a mean over elements): seed post-fix 1e-3,
    paper 0.004; the seed's 3e-7 was a batch-summed bug (~2.5e-3 per example)."""
    lr: float = 3e-4
    """Adam learning rate, constant (paper, seed)."""
    batch_size: int = 8192
    """Activation vectors per step."""
    n_steps: int = 0
    """Training steps (0 = one pass over the activation shards without replacement)."""
    resample_at: tuple[int, ...] = (25_000, 50_000, 75_000, 100_000)
    """Steps at which dead features are resampled (paper); empty disables."""
    dead_window: int = 12_500
    """A feature that did not fire in this many steps before a resample is dead (paper)."""
    resample_inputs: int = 819_200
    """Fresh inputs scored by loss^2 at each resampling (paper)."""
    geom_median_samples: int = 8192
    """Sample size for the geometric-median init of b_dec (paper)."""
    shuffle_buffer: int = 262_144
    """Rows in the training reader's local shuffle buffer."""
    eval_interval: int = 1000
    """Steps between evaluations (and checkpoints)."""
    eval_contexts: int = 64
    """Held-out validation contexts for the LM-loss metrics: a random sample of the val
    split seeded by the run's seed alone, so every trial of a sweep evaluates on the same."""
    mean_rows: int = 1_048_576
    """Training rows averaged for the mean-ablation baseline L_mean (0 = every row): the
    first rows of the seeded training stream, computed once per activation dataset."""
    density_window: int = 10_000_000
    """Training rows of the trailing window the feature densities (and the dead / ultralow /
    dense counts) are counted over: resolution 1 / rows (paper scale: ~1e-7)."""
    ultralow_density: float = 1e-5
    """Alive features below this training-stream density count as ultralow. Our cutoff, not
    the paper's: its A/1 ultralow cluster sits below 1e-6."""
    checkpoint_interval: int = 5000
    """Steps between checkpoints (also written at each eval and at the end)."""
    report_interval: int = 200
    """Steps between progress reports to Tune (train loss, MSE, L0, dead fraction: no eval,
    no checkpoint; ~1 s of a paper-shaped step on an H100); 0 = report at checkpoints only."""
    device: str = "auto"
    """cpu, cuda or auto."""

    @property
    def window_starts(self) -> tuple[int, ...]:
        """The step each resample's dead window opens at (sorted like resample_at):
        `dead_window` steps before it, but never before the previous resample (or step 0).
        One window per pending resample, so a window longer than the gap between two
        resamples starts right after the first instead of overlapping it."""
        steps = sorted(self.resample_at)
        return tuple(max(prev, s - self.dead_window) for prev, s in zip([0, *steps], steps))

    def __post_init__(self):
        _positive(self, "n_features", "l1_coeff", "lr", "batch_size", "dead_window",
                  "resample_inputs", "geom_median_samples", "shuffle_buffer",
                  "eval_interval", "eval_contexts", "checkpoint_interval", "density_window")
        _non_negative(self, "n_steps", "report_interval", "mean_rows")
        _fraction(self, "ultralow_density")
        _choice(self, "device", ("auto", "cpu", "cuda"))
        if any(s <= 0 for s in self.resample_at) or list(self.resample_at) != sorted(
            set(self.resample_at)
        ):
            raise ValueError(
                f"SaeConfig.resample_at must be increasing positive steps, got {self.resample_at}"
            )


@dataclass(frozen=True)
class SweepConfig:
    """Stage 4: Ray Tune grid over l1_coeff x lr, one SAE training per grid point."""

    l1_coeff: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    """L1 coefficients of the grid."""
    lr: tuple[float, ...] = (1e-4, 3e-4)
    """Learning rates of the grid."""
    n_features: tuple[int, ...] = ()
    """Dictionary sizes of the grid (an axis like l1_coeff and lr: every size trains on the
    same stream, seed, l1 and lr); empty = sae.n_features alone."""
    name: str = "sweep"
    """Experiment name: <storage_path>/<name>."""
    storage_path: str = ""
    """Where Tune keeps the experiment: '' = <out>/sweep; s3://... on multi-node clusters."""
    cpus_per_trial: float = 1.0
    """CPUs reserved per trial (keep the total below the node's CPUs for data reads); its
    torch threads (floor, at least 1: mono/threads.py)."""
    gpus_per_trial: float = 0.0
    """GPUs per trial; fractions pack several SAEs on one GPU."""
    max_concurrent_trials: int = 0
    """Trials running at once (0 = as many as resources allow)."""
    max_failures: int = 2
    """Retries of a crashed trial from its last checkpoint."""
    pack: int = 0
    """SAEs per trial (mono.pack): grid points that differ only in l1_coeff and lr train in
    packs of up to this many on one shared activation stream (one read per batch); 0 = as
    many as fit the trial's device memory; 1 = one SAE per trial."""
    draw_rows_per_group: int = 512
    """Rows a resampling draw takes from each Parquet row group it reads: a draw of n rows
    reads ~n / this row groups instead of ~n (paper: 1.6 k groups for 819,200 rows)."""
    wandb: bool = False
    """Log to Weights & Biases (offline when no WANDB_API_KEY is set)."""

    def __post_init__(self):
        if not self.l1_coeff or not self.lr:
            raise ValueError(
                f"SweepConfig grid is empty: l1_coeff={self.l1_coeff!r} lr={self.lr!r}"
            )
        for name in ("l1_coeff", "lr"):
            for v in getattr(self, name):
                if not (v > 0 and math.isfinite(v)):
                    raise ValueError(f"SweepConfig.{name} values must be positive, got {v!r}")
        if any(not isinstance(n, int) or n <= 0 for n in self.n_features) or len(
                set(self.n_features)) != len(self.n_features):
            raise ValueError(f"SweepConfig.n_features must be distinct positive sizes, got "
                             f"{self.n_features!r}")
        _positive(self, "draw_rows_per_group")
        _non_negative(self, "cpus_per_trial", "gpus_per_trial", "max_concurrent_trials",
                      "max_failures", "pack")


@dataclass(frozen=True)
class AnalysisConfig:
    """Stage 5: per-feature statistics over the activation shards and static HTML pages."""

    trial: str = ""
    """Trial to analyse: a trial name of the sweep's trials.json, or a path to an SAE export
    dir (cfg.json + sae.safetensors); '' = the sweep's best by loss_recovered_mean (loss
    recovered against mean ablation) among trials with L0 <= target_l0, else
    <out>/sae_single/sae."""
    max_rows: int = 0
    """Activation rows scanned (0 = all): the first rows of every shard, in proportion
    (rows are shuffled within a shard, so that is a uniform sample of each)."""
    top_k: int = 10
    """Top activating examples kept per feature."""
    n_intervals: int = 12
    """Activation-value intervals between 0 and each feature's max, sampled (paper: 11-12,
    evenly spaced in value; the seed's rank quantiles were not)."""
    samples_per_interval: int = 5
    """Examples kept per interval."""
    window: int = 4
    """Tokens shown on each side of the activating token (paper: 4)."""
    target_l0: float = 20.0
    """Largest L0 a trial may have to be picked as 'best' by default."""
    hist_bins: int = 32
    """Bins of each feature's activation histogram, evenly spaced over (0, max]."""
    logit_tokens: int = 10
    """Tokens listed at each end of a feature's logit effects (seed, paper: 10)."""
    logit_min_count: int = 10
    """Tokens that occur fewer times than this in the training token shards are left out of
    the logit-effect lists and their median (their embedding rows are barely trained and
    otherwise lead the lists); 0 keeps every token."""
    ultralow_density: float = 1e-5
    """Alive features below this density over the rows scanned are 'ultralow' (our cutoff,
    as sae.ultralow_density; the paper's A/1 ultralow cluster sits below 1e-6)."""
    dense_density: float = 1e-2
    """Features above this density are 'dense' (the training metrics' cutoff)."""
    seed_cutoff: float = 1e-3
    """Density splitting the seed's high_density.html from ultra_low_density.html."""
    batch_rows: int = 4096
    """Activation rows encoded per SAE forward in a scan task."""
    n_tasks: int = 0
    """Ray tasks per pass over the shards (0 = 2 per CPU of the cluster)."""
    use_gpu: bool = False
    """Give each scan task one GPU (the SAE forward then runs on CUDA)."""

    def __post_init__(self):
        _positive(self, "top_k", "n_intervals", "samples_per_interval", "target_l0",
                  "hist_bins", "logit_tokens", "batch_rows")
        _non_negative(self, "max_rows", "window", "n_tasks", "logit_min_count")
        for name in ("ultralow_density", "dense_density", "seed_cutoff"):
            _fraction(self, name)
        if not self.ultralow_density < self.dense_density:
            raise ValueError(f"AnalysisConfig.ultralow_density ({self.ultralow_density}) must "
                             f"be < dense_density ({self.dense_density})")


@dataclass(frozen=True)
class SplittingConfig:
    """Feature splitting: features of one trial per dictionary size matched across sizes."""

    trials: tuple[str, ...] = ()
    """Trials to match, one per dictionary size (names in the sweep's trials.json); empty =
    every finished size at the l1_coeff and lr of the sweep's best trial (analysis.target_l0)."""
    threshold: float = 0.7
    """Decoder cosine at or above which a feature and a parent candidate are linked (a close
    match one size down; links make the families)."""
    candidates: int = 3
    """Parent candidates kept per feature: its top decoder cosines in the next smaller
    dictionary (two or more linked ones make a merge)."""
    sample_rows: int = 65_536
    """Activation rows of the shared sample the activation correlations use (the first rows
    of every shard, in proportion: a uniform sample, rows being shuffled within shards)."""
    block: int = 4096
    """Rows per side of a block of the decoder-cosine products (block^2 float32 at a time)."""
    batch_rows: int = 1024
    """Activation rows encoded per SAE forward in a correlation task (it holds two sizes'
    (batch_rows, F) activations at once: 0.8 GB at 65,536 + 131,072 features)."""
    n_tasks: int = 0
    """Ray tasks over the sample (0 = 2 per CPU of the cluster)."""
    map_method: str = "umap"
    """2-D map of every decoder direction: umap (cosine metric, as the paper's map) or pca."""
    map_points: int = 30_000
    """Most features drawn in the interactive SVG map (a seeded sample beyond; the PNG
    shows all)."""
    analyze: bool = True
    """Analyse each matched trial that has no analysis yet (its feature pages are what the
    family pages link to)."""

    def __post_init__(self):
        _positive(self, "candidates", "sample_rows", "block", "batch_rows", "map_points")
        _non_negative(self, "n_tasks")
        _fraction(self, "threshold")
        _choice(self, "map_method", ("umap", "pca"))


@dataclass(frozen=True)
class Config:
    """Every stage's settings, and where the run's artifacts live."""

    out: str = "runs/demo"
    """Run directory (local path or s3:// URI): every stage reads and writes under it."""
    seed: int = 0
    """Seed for splits, sampling and initialisation."""
    tokens: TokensConfig = field(default_factory=TokensConfig)
    lm: LmConfig = field(default_factory=LmConfig)
    train_lm: TrainLmConfig = field(default_factory=TrainLmConfig)
    acts: ActsConfig = field(default_factory=ActsConfig)
    sae: SaeConfig = field(default_factory=SaeConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    splitting: SplittingConfig = field(default_factory=SplittingConfig)

    def __post_init__(self):
        if not self.out:
            raise ValueError("Config.out must be a directory, got ''")
        # numpy's default_rng rejects negative seeds deep inside a stage: refuse them here.
        _non_negative(self, "seed")
        if self.lm.block_size < self.tokens.ctx_len:
            raise ValueError(
                f"lm.block_size ({self.lm.block_size}) must be >= tokens.ctx_len "
                f"({self.tokens.ctx_len})"
            )
        if self.acts.tokens_per_context > self.tokens.ctx_len:
            raise ValueError(
                f"acts.tokens_per_context ({self.acts.tokens_per_context}) must be <= "
                f"tokens.ctx_len ({self.tokens.ctx_len})"
            )

    # --- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return from_dict(cls, d)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Config:
        return cls.from_json(Path(path).read_text())


SECTIONS: dict[str, type] = {
    f.name: f.default_factory for f in fields(Config)
    if f.default_factory is not dataclasses.MISSING
}
"""Section name -> its dataclass, in pipeline order."""


def field_types(cls: type) -> dict[str, typing.Any]:
    """Resolved type hints of a config dataclass (the annotations are strings)."""
    return typing.get_type_hints(cls)


def from_dict(cls: type, d: dict):
    """Build a (nested) config dataclass from a plain dict; unknown keys raise."""
    hints = field_types(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def with_overrides(cfg: Config, **sections: dict) -> Config:
    """`with_overrides(cfg, sae={"l1_coeff": 3e-3}, out="x")`: a new config, validated."""
    top = {k: v for k, v in sections.items() if k not in SECTIONS}
    sub = {k: replace(getattr(cfg, k), **v) for k, v in sections.items() if k in SECTIONS}
    return replace(cfg, **top, **sub)


# --- presets ---------------------------------------------------------------------------
# tiny: tests and smoke runs, seconds on 2 cores. demo: the README's offline run, the whole
# pipeline within ~10 min on 2 cores with a paper-shaped LM (128/512) at short context.
# paper: the seed's numbers (seed_spec.md §1-§6) for clusters.

PRESETS: dict[str, Config] = {
    "tiny": Config(
        out="runs/tiny",
        # Smoke-test sizes: the whole pipeline in well under a minute on 2 cores. 40 of
        # the embedded corpus's documents (~1 k contexts of 64), an LM trained in this process
        # (no Ray Train start-up), every context collected, one pass (~60 SAE steps).
        tokens=TokensConfig(ctx_len=64, docs_per_block=256, max_docs=40),
        lm=LmConfig(d_model=32, n_head=2, d_mlp=128, block_size=64),
        train_lm=TrainLmConfig(max_iters=16, batch_size=8, grad_accum=1, lr=3e-3, min_lr=3e-4,
                               warmup_iters=4, eval_interval=8, eval_iters=2, log_interval=8,
                               max_failures=0, num_workers=0),
        acts=ActsConfig(tokens_per_context=16, n_contexts=0, batch_contexts=16,
                        shard_contexts=64, row_group_rows=256),
        sae=SaeConfig(n_features=256, batch_size=256, n_steps=0, resample_at=(8,),
                      dead_window=4, resample_inputs=1024, geom_median_samples=512,
                      shuffle_buffer=2048, eval_interval=8, eval_contexts=4,
                      checkpoint_interval=16, report_interval=4),
        sweep=SweepConfig(l1_coeff=(1e-3, 1e-2), lr=(1e-3,)),
        analysis=AnalysisConfig(top_k=5, n_intervals=4, samples_per_interval=2, window=3,
                                target_l0=1e9),
    ),
    "demo": Config(
        out="runs/demo",
        # Embedded corpus (Python 3.11.7): 724 documents, 644 k tokens; 5% of the documents
        # for val gives a few hundred contexts of 128 to evaluate on (README figures).
        tokens=TokensConfig(ctx_len=128, val_fraction=0.05, min_val_docs=16),
        # Paper-shaped (DESIGN.md): 128/512, where the tied 50304-wide unembedding is ~97%
        # of the FLOPs. 450 steps of 4 x 128 tokens (230 k) at lr 3e-3 are what fits the
        # LM's share of a ~10 min demo on 2 cores, and end well below a unigram model's
        # cross-entropy (README figures: the learning curve and tokens/s).
        lm=LmConfig(block_size=128),
        train_lm=TrainLmConfig(max_iters=450, batch_size=4, grad_accum=1, lr=3e-3,
                               min_lr=3e-4, warmup_iters=30, eval_interval=225, eval_iters=40,
                               log_interval=50),
        # Half the positions of T=128 (paper: 250 of 1024): ~300 k rows from the embedded
        # corpus's ~4.7 k train contexts.
        acts=ActsConfig(tokens_per_context=64, n_contexts=0, batch_contexts=32,
                        shard_contexts=256),
        # 2x dictionary, ~4 passes over the ~300 k rows (train_sae warns that rows repeat),
        # resampling at 1/4, 1/2, 3/4 of the run. lr 3e-4 is the paper's (1e-3 left far more
        # features dead; README figures, "demo SAE settings"). Two evals, at the middle and
        # the end, on 64 x 128 val tokens (each costs unembedding passes: few contexts); the
        # mean over all ~300 k rows; densities over the last 300 steps' rows (after the last
        # resample: resolution 3e-6).
        sae=SaeConfig(n_features=1024, l1_coeff=5e-3, lr=3e-4, batch_size=1024, n_steps=1200,
                      resample_at=(300, 600, 900), dead_window=150, resample_inputs=65_536,
                      geom_median_samples=4096, shuffle_buffer=65_536, eval_interval=600,
                      eval_contexts=64, checkpoint_interval=600, report_interval=50, mean_rows=0,
                      density_window=307_200),
        # Three l1 values x three dictionary sizes (0.5x, 1x, 2x the MLP width, for the
        # splitting stage): one pack per size, its three l1 members reading the stream once;
        # a pack's 2 CPUs give torch 2 threads for the members' steps (README figures).
        sweep=SweepConfig(l1_coeff=(2e-3, 5e-3, 1.2e-2), lr=(3e-4,), n_features=(256, 512, 1024),
                          cpus_per_trial=2.0),
        # All ~300 k rows, paper-style pages (top 10, 12 intervals x 5, +-4 tokens). The
        # default trial is the best loss_recovered_mean with L0 <= 30: the short demo runs may
        # end above the paper's L0 (< 10-20).
        analysis=AnalysisConfig(target_l0=30.0),
    ),
    "paper": Config(
        out="runs/paper",
        tokens=TokensConfig(corpus="hf:Skylion007/openwebtext", ctx_len=1024,
                            val_fraction=0.0005),
        # GPU nodes of cluster.yaml (8 CPUs, 1 GPU): 6 CPUs write shards while the GPU runs.
        # 5.12 M contexts x 200 = 1.024 B rows = 125 k SAE steps of 8192 in one pass: all four
        # of the paper's resamples (25 k ... 100 k) run, with 25 k steps after the last (2 M
        # contexts gave 48.8 k steps: three never ran). OpenWebText holds ~8.8 M contexts of
        # 1024 tokens.
        acts=ActsConfig(tokens_per_context=200, n_contexts=5_120_000, batch_contexts=64,
                        use_gpu=True, cpus_per_actor=6),
        train_lm=TrainLmConfig(use_gpu=True),
        sae=SaeConfig(device="auto"),
        # Runs A/0 ... A/5 of the paper: 512 ... 131,072 features on the same activations.
        sweep=SweepConfig(gpus_per_trial=0.25, cpus_per_trial=2.0,
                          n_features=(512, 4096, 16_384, 32_768, 65_536, 131_072)),
    ),
}


def preset(name: str) -> Config:
    """The named preset; an unknown name raises with the valid choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
