"""Stage 4: the files of one SAE run, its checkpoints and its export; no training.

`mono.train_sae` writes them under its `workdir` (a local directory), and sweeps publish the
export and metrics to <out>/sweep/<name>/<trial>/ (mono.trial); analysis and splitting read
the export back from there, locally or on object storage (`load_sae`):

    checkpoint/     the latest checkpoint, replaced atomically (written to a temporary dir,
                    then renamed): sae.safetensors, trainer.safetensors (FeatureAdam moments
                    and per-feature step counts, the fired mask), state.json (step, reader
                    position, resampling RNG, metrics history, cached eval baselines, what
                    the run trained on; the fire counts (mono.density) and the dead-window
                    mask sit in trainer.safetensors as run.fires.* / run.window),
                    density.npy (training-window densities (F,) of the last eval)
    sae/            the export: cfg.json + sae.safetensors, and sae_lens/ (cfg.json +
                    sae_weights.safetensors) in SAELens's on-disk format
    metrics.json    the final metrics; history.json every eval's
    density.png     log10 training-window feature-density histogram of the last eval

Checkpoints: `write_dir_atomic` writes a directory in a temporary sibling and swaps it in,
so a crash leaves the old or the new one complete; `latest_checkpoint` finds it (or the one
a crash mid-swap left); `read_checkpoint` reads it back, refusing another format version;
`check_resumable` refuses one of another dictionary size, input width, SAE setting or
activation dataset (`RESUMABLE_CHANGES`: the SaeConfig fields a resume may change).

Loading the export elsewhere:

    from mono.sae_files import load_sae
    sae, cfg = load_sae("runs/demo/sae_single/sae")        # SparseAutoencoder + cfg.json

    from sae_lens import SAE                               # SAELens 5.x and 6.x
    sae = SAE.load_from_disk("runs/demo/sae_single/sae/sae_lens", device="cpu")

The SAELens cfg.json uses the flat pre-6.0 keys (d_in, d_sae, architecture "standard",
hook_name, model_name, ...) without a sae_lens_version, which SAELens 6 converts on load
(`handle_pre_6_0_config`) and SAELens 5 reads as is. The hook name follows TransformerLens
("blocks.0.mlp.hook_post"), but the model is mono's own LM, not a TransformerLens one:
feed SAELens activations from `Lm.mlp_acts`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid

import numpy as np
import safetensors
import safetensors.torch
from torch import Tensor

from mono import store
from mono.config import Config
from mono.errors import UserError
from mono.sae import SparseAutoencoder

CHECKPOINT, EXPORT, SAE_LENS = "checkpoint", "sae", "sae_lens"
SAE_WEIGHTS, TRAINER_STATE, STATE, DENSITY = (
    "sae.safetensors", "trainer.safetensors", "state.json", "density.npy")
METRICS, HISTORY, DENSITY_PNG = "metrics.json", "history.json", "density.png"
CHECKPOINT_FORMAT = "mono.sae_checkpoint/2"
# SaeConfig fields a resume may change; any other difference means another experiment.
RESUMABLE_CHANGES = ("n_steps", "eval_interval", "checkpoint_interval", "report_interval",
                     "device", "ultralow_density")


# --- checkpoints -----------------------------------------------------------------------


def write_dir_atomic(final: str, files: dict[str, bytes]) -> None:
    """Write `files` into a fresh temporary sibling dir, then swap it in for `final`.

    A crash leaves either the old or the new directory complete: between the two renames
    only `final.prev` exists, and `latest_checkpoint` falls back to it.
    """
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    for name, data in files.items():
        with open(os.path.join(tmp, name), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    prev = f"{final}.prev"
    shutil.rmtree(prev, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, prev)
    os.rename(tmp, final)
    shutil.rmtree(prev, ignore_errors=True)


def latest_checkpoint(workdir: str) -> str | None:
    """workdir/checkpoint, or the previous one a crash mid-swap left, or None. Deletes
    temporary dirs of interrupted writes."""
    final = os.path.join(workdir, CHECKPOINT)
    if os.path.isdir(workdir):
        for name in os.listdir(workdir):
            if name.startswith((f"{CHECKPOINT}.tmp-", f"{EXPORT}.tmp-")):
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    for path in (final, f"{final}.prev"):
        if os.path.isdir(path):
            return path
    return None


def read_checkpoint(path: str) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """(state.json + "density", SAE weights, trainer state) of a checkpoint dir; ValueError
    if any part is missing or unreadable."""
    try:
        with open(os.path.join(path, STATE), "rb") as fh:
            state = json.loads(fh.read())
        weights = safetensors.torch.load_file(os.path.join(path, SAE_WEIGHTS))
        trainer = safetensors.torch.load_file(os.path.join(path, TRAINER_STATE))
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        raise ValueError(f"unreadable SAE checkpoint {path}: {err}") from err
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}/{STATE} is not a mono SAE checkpoint of this version "
                         f"(format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}): "
                         f"start the run afresh in another workdir")
    try:
        with open(os.path.join(path, DENSITY), "rb") as fh:
            state["density"] = np.load(fh)
    except (OSError, ValueError) as err:
        raise ValueError(f"unreadable SAE checkpoint {path}: {err}") from err
    return state, weights, trainer


def check_resumable(path: str, state: dict, cfg: Config, inputs: dict) -> None:
    """Refuse a checkpoint of another dictionary, width, SAE setting or dataset."""
    problems = []
    if state["H"] != inputs["H"]:
        problems.append(f"input width H={state['H']} (now {inputs['H']})")
    if state["acts_sha256"] != inputs["acts_sha256"]:
        problems.append(f"activation dataset {state['acts_sha256'][:12]} (now "
                        f"{inputs['acts_sha256'][:12]})")
    if state["seed"] != cfg.seed:
        problems.append(f"seed={state['seed']} (now {cfg.seed})")
    now = dataclasses.asdict(cfg.sae)
    for k, v in state["sae"].items():
        if k not in RESUMABLE_CHANGES and json.loads(json.dumps(now.get(k))) != v:
            problems.append(f"sae.{k}={v!r} (now {now.get(k)!r})")
    if problems:
        raise ValueError(f"checkpoint {path} belongs to another run: {'; '.join(problems)}")


# --- export ----------------------------------------------------------------------------


def hook_name(cfg: Config) -> str:
    """TransformerLens's name for the SAE's input: the last block's MLP post-activation."""
    return f"blocks.{cfg.lm.n_layer - 1}.mlp.hook_post"


def sae_lens_cfg(cfg: Config, sae: SparseAutoencoder, inputs: dict) -> dict:
    """SAELens's cfg.json for a standard (ReLU) SAE, flat pre-6.0 keys (module docstring)."""
    return {
        "architecture": "standard", "d_in": sae.d_in, "d_sae": sae.n_features,
        "activation_fn_str": "relu", "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
        "normalize_activations": "none", "dtype": "float32", "device": "cpu",
        "model_name": f"mono-lm-{inputs['lm_sha256'][:12]}", "hook_name": hook_name(cfg),
        "hook_layer": cfg.lm.n_layer - 1, "hook_head_index": None,
        "context_size": inputs["ctx_len"], "prepend_bos": False,
        "dataset_path": store.Layout(cfg.out).acts, "dataset_trust_remote_code": False,
        "sae_lens_training_version": None, "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
    }


def export(workdir: str, cfg: Config, sae: SparseAutoencoder, inputs: dict,
           metrics: dict) -> str:
    """Write workdir/sae/ (cfg.json, sae.safetensors, sae_lens/) atomically; returns it."""
    weights = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    blob = safetensors.torch.save(weights, metadata={"format": "mono.sae/1"})
    info = {
        "format": "mono.sae/1", "d_in": sae.d_in, "n_features": sae.n_features,
        "l1_coeff": sae.l1_coeff, "hook_point": hook_name(cfg),
        "hook_doc": "last block's MLP activation after the GELU, before c_proj (Lm.mlp_acts)",
        "sae": dataclasses.asdict(cfg.sae), "seed": cfg.seed, "out": cfg.out,
        "acts_sha256": inputs["acts_sha256"], "lm_sha256": inputs["lm_sha256"],
        "tokens_sha256": inputs["manifest"]["tokens_sha256"], "ctx_len": inputs["ctx_len"],
        "metrics": metrics,
    }
    final = os.path.join(workdir, EXPORT)
    write_dir_atomic(final, {"cfg.json": json.dumps(info, indent=2).encode(),
                              SAE_WEIGHTS: blob})
    lens_cfg = json.dumps(sae_lens_cfg(cfg, sae, inputs), indent=2).encode()
    write_dir_atomic(os.path.join(final, SAE_LENS),
                      {"cfg.json": lens_cfg, "sae_weights.safetensors": blob})
    return final


def load_sae(sae_dir: str, device: str = "cpu") -> tuple[SparseAutoencoder, dict]:
    """(SparseAutoencoder, its cfg.json dict) from an export dir (workdir/sae), local or a
    URI."""
    try:  # through store: sae_dir may be a local path or an s3:// / gs:// URI
        info = store.read_json(store.join(sae_dir, "cfg.json"))
        weights = safetensors.torch.load(store.read_bytes(store.join(sae_dir, SAE_WEIGHTS)))
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        raise UserError(f"unreadable SAE export {sae_dir}: {err}") from err
    sae = SparseAutoencoder(info["d_in"], info["n_features"], info["l1_coeff"], device=device)
    load_weights(sae, weights, sae_dir)
    return sae.eval(), info


def load_weights(sae: SparseAutoencoder, weights: dict[str, Tensor], where: str) -> None:
    want = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if want != got:
        raise UserError(f"SAE weights in {where} have shapes {got}, expected {want} "
                        f"(n_features={sae.n_features}, H={sae.d_in})")
    sae.load_state_dict(weights)
