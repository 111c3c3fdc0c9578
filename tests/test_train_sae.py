"""Stage 4: one SAE training run (mono.train_sae): eval, checkpoints, exact resume, export.

One module fixture builds a tiny run dir without Ray: token shards holding a noisy cycle
over a few ids (the LM learns it in a few dozen steps, so its MLP matters), the LM trained
by `train_lm.train` in plain torch, and activation shards written by `acts.Collector`
directly. One straight SAE run through `train_sae.run` is shared by the tests that compare
against it; the resume, fault and bad-input tests train or start their own short runs.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch

from mono import acts, sae_files, store, train_lm, train_sae
from mono.config import PRESETS, with_overrides
from mono.metrics import EvalSet, acts_mean, eval_contexts
from mono.reader import ActsReader
from mono.sae import SparseAutoencoder

T, N_TRAIN, N_VAL, EVAL_CTX = 64, 256, 12, 4
# 4096 rows / 128 = 32 steps; features unused for 6 steps before steps 16 and 28 are
# resampled (~100 and ~270 of 512 with this LM: both resamples always have work).
# Density blocks of 3 steps (window 3072 rows = 8 blocks x 3 x 128): block boundaries fall
# between evals, checkpoints and resamples, so the resume tests cover the fire-count ring.
SAE = dict(n_features=512, l1_coeff=3e-3, lr=3e-3, batch_size=128, n_steps=0,
           resample_at=(16, 28), dead_window=6, resample_inputs=1024, geom_median_samples=512,
           shuffle_buffer=2048, eval_interval=8, eval_contexts=EVAL_CTX, checkpoint_interval=4,
           mean_rows=0, density_window=3072)
LM_STEPS = 16  # enough for the LM to learn the cycle well below its unigram entropy
METRIC_KEYS = {"step", "examples", "l0", "mse", "explained_variance", "l1", "loss", "L_orig",
               "L_zero", "L_mean", "L_bdec", "L_sae", "loss_recovered", "loss_recovered_mean",
               "nll_score", "ce_increase", "kl", "dead", "ultralow", "dense", "window_rows",
               "dead_since_eval", "ultralow_since_eval", "dense_since_eval", "since_eval_rows",
               "dead_eval", "ultralow_eval", "dense_eval", "eval_tokens", "n_resampled",
               "samples_per_s"}


def write_tokens(out: str, n_sym: int = 16, noise: float = 0.05, seed: int = 0) -> None:
    """Train/val token shards + manifest (stage-1 format): each split one stream cut into
    consecutive windows, stepping through a cycle of n_sym ids with random jumps."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(50000)[:n_sym] + 100
    splits = {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        steps = np.where(rng.random(n * T) < noise, rng.integers(1, n_sym, n * T), 1)
        toks = ids[np.cumsum(steps) % n_sym].reshape(n, T)
        files = []
        for first in range(0, n, 100):
            k = min(100, n - first)
            name = f"part-{len(files):05d}.parquet"
            store.write_table_atomic(store.join(store.Layout(out).tokens(split), name),
                                     store.token_table(np.arange(first, first + k),
                                                       toks[first:first + k]))
            files.append({"name": name, "first": first, "rows": k})
        splits[split] = {"rows": n, "tokens": n * T, "files": files}
    store.write_json(store.Layout(out).tokens_manifest, {
        "tokenizer": "synthetic", "ctx_len": T, "dtype": "uint16",
        "rows": {s: v["rows"] for s, v in splits.items()}, "splits": splits})


def collect(cfg) -> dict:
    """Activation shards + manifest as acts.run writes them, without Ray."""
    tm, settings, n = acts.check_inputs(cfg)
    chunks = acts.plan(n, cfg.acts.shard_contexts)
    collector = acts.Collector(cfg.out, settings)
    for first, k in chunks:
        collector.collect(first, k)
    manifest = acts._manifest(cfg, settings, tm, chunks)
    store.write_json(store.Layout(cfg.out).acts_manifest, manifest)
    return manifest


def make_cfg(out, **sae):
    return with_overrides(
        PRESETS["tiny"], out=str(out), sae={**SAE, **sae},
        train_lm=dict(max_iters=LM_STEPS, batch_size=8, lr=2e-2, min_lr=2e-3, warmup_iters=2,
                      eval_interval=LM_STEPS, eval_iters=1, log_interval=LM_STEPS))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sae_run")
    cfg = make_cfg(out)
    write_tokens(str(out))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MONO_CACHE_DIR", str(out / "cache"))
        lm_metrics = train_lm.train(cfg)
    collect(cfg)
    return {"out": out, "cfg": cfg, "lm_metrics": lm_metrics}


@pytest.fixture(scope="module")
def straight(run_dir):
    """The reference run: 32 steps straight through train_sae.run, with on_eval recorded."""
    cfg, calls = run_dir["cfg"], []
    workdir = store.join(cfg.out, "sae_single")

    def on_eval(metrics, path):  # what the sweep does: the checkpoint must be complete here
        calls.append((metrics["step"], sorted(os.listdir(path)),
                      json.loads(open(os.path.join(path, "state.json")).read())["step"]))

    metrics = train_sae.train(cfg, workdir, on_eval=on_eval)
    weights = safetensors.torch.load_file(os.path.join(workdir, "checkpoint", "sae.safetensors"))
    state = json.loads(open(os.path.join(workdir, "checkpoint", "state.json")).read())
    return {"metrics": metrics, "workdir": workdir, "calls": calls, "weights": weights,
            "state": state}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# --- the straight run --------------------------------------------------------------------


def test_run_writes_checkpoint_export_metrics(straight, run_dir):
    m, wd = straight["metrics"], straight["workdir"]
    assert METRIC_KEYS <= m.keys()
    assert m["step"] == 32 and m["examples"] == 32 * 128
    assert all(isinstance(v, (int, float)) for v in m.values())
    assert np.isfinite(m["loss_recovered"]) and m["nll_score"] == pytest.approx(
        1 - m["loss_recovered"])
    assert 0 < m["l0"] < 512 and 0 < m["explained_variance"] <= 1
    assert m["n_resampled"] > 0, "the run must exercise resampling"
    assert m["eval_tokens"] == EVAL_CTX * T
    assert json.loads(open(os.path.join(wd, "metrics.json")).read()) == m
    history = json.loads(open(os.path.join(wd, "history.json")).read())
    assert [h["step"] for h in history] == [8, 16, 24, 32]
    assert sorted(os.listdir(os.path.join(wd, "checkpoint"))) == [
        "density.npy", "sae.safetensors", "state.json", "trainer.safetensors"]
    density = np.load(os.path.join(wd, "checkpoint", "density.npy"))
    assert density.shape == (512,) and m["dead"] == int((density == 0).sum())
    # training-stream densities: exact counts over whole steps of 128 rows; the trailing
    # window holds the current 3-step block (32 = 10 x 3 + 2) and the 8 before it
    assert m["window_rows"] == (8 * 3 + 2) * 128 and m["since_eval_rows"] == 8 * 128
    np.testing.assert_allclose(density * m["window_rows"], np.round(density * m["window_rows"]),
                               atol=1e-9)
    assert m["ce_increase"] == pytest.approx(m["L_sae"] - m["L_orig"]) and m["kl"] > 0
    png = open(os.path.join(wd, "density.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert not [n for n in os.listdir(wd) if ".tmp-" in n or n.endswith(".prev")]
    # on_eval saw a complete checkpoint of its own step each time
    assert [c[0] for c in straight["calls"]] == [8, 16, 24, 32]
    assert all(c[2] == c[0] and "sae.safetensors" in c[1] for c in straight["calls"])


def test_eval_baselines_are_cached_and_the_lm_uses_its_mlp(straight, run_dir):
    history = json.loads(open(os.path.join(straight["workdir"], "history.json")).read())
    assert len({(h["L_orig"], h["L_zero"], h["L_mean"]) for h in history}) == 1
    m = straight["metrics"]
    # The trained LM predicts the cycle (below the unigram entropy); its MLP helps it.
    assert m["L_orig"] < run_dir["lm_metrics"]["unigram_entropy"]
    assert m["L_orig"] < m["L_mean"] <= m["L_zero"]


def test_eval_metrics_match_a_naive_computation(straight, run_dir):
    cfg = run_dir["cfg"]
    lm = store.load_lm(cfg.out)
    sae, _ = sae_files.load_sae(os.path.join(straight["workdir"], "sae"))
    ev = EvalSet(cfg, lm, torch.device("cpu"), sae.n_features)
    mean = acts_mean(cfg, train_sae.check_inputs(cfg))
    metrics, density = ev.evaluate(sae, mean)
    x = ev.acts.flatten(0, 1).double()
    with torch.no_grad():
        out = sae(x.float())
    f, x_hat = out.f.double(), out.x_hat.double()
    assert metrics["l0"] == pytest.approx(float((f > 0).sum(1).float().mean()))
    assert metrics["mse"] == pytest.approx(float(((x_hat - x) ** 2).mean()), rel=1e-5)
    assert metrics["l1"] == pytest.approx(float(f.sum(1).mean()), rel=1e-5)
    ev_ref = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert metrics["explained_variance"] == pytest.approx(float(ev_ref), rel=1e-5)
    np.testing.assert_allclose(density, (f > 0).double().mean(0).numpy())
    # the mean over every training row, read straight from the shards
    rows = np.concatenate([store.table_acts(pq.read_table(f), float32=True)[3]
                           for f in store.acts_files(cfg.out)])
    np.testing.assert_allclose(mean, rows.astype(np.float64).mean(0), rtol=1e-9, atol=1e-12)
    tokens = store.read_context(cfg.out, np.arange(N_VAL), "val")
    ids = ev.ctx
    idx = torch.from_numpy(tokens[ids])
    nxt = torch.from_numpy(np.array([tokens[i + 1, 0] if i + 1 < N_VAL else -1 for i in ids]))
    tgt = torch.cat([idx[:, 1:], nxt[:, None]], dim=1)
    with torch.no_grad():
        logits_orig = lm(idx).logits
        ref_orig = float(torch.nn.functional.cross_entropy(
            logits_orig.flatten(0, 1), tgt.flatten(), ignore_index=-1))
    assert metrics["L_orig"] == pytest.approx(ref_orig, rel=1e-5)
    zero = lm.loss_with_mlp_acts(idx, tgt, torch.zeros(EVAL_CTX, T, 128))
    assert metrics["L_zero"] == pytest.approx(float(zero), rel=1e-5)
    mean_t = torch.from_numpy(mean).float().expand(EVAL_CTX, T, 128)
    abl = lm.loss_with_mlp_acts(idx, tgt, mean_t)
    assert metrics["L_mean"] == pytest.approx(float(abl), rel=1e-5)
    bdec = lm.loss_with_mlp_acts(idx, tgt, sae.b_dec.detach().expand(EVAL_CTX, T, 128))
    assert metrics["L_bdec"] == pytest.approx(float(bdec), rel=1e-5)
    recon = lm.loss_with_mlp_acts(idx, tgt, out.x_hat.view(EVAL_CTX, T, 128))
    assert metrics["L_sae"] == pytest.approx(float(recon), rel=1e-5)
    assert metrics["loss_recovered"] == pytest.approx(
        (float(zero) - float(recon)) / (float(zero) - ref_orig), rel=1e-4)
    assert metrics["loss_recovered_mean"] == pytest.approx(
        (float(abl) - float(recon)) / (float(abl) - ref_orig), rel=1e-4)
    # KL(original || spliced) per token, from the full logits of both forwards
    site = lm.mlp_site(idx)
    x = site.resid + lm.transformer.h[-1].mlp.c_proj(out.x_hat.view(EVAL_CTX, T, 128))
    with torch.no_grad():
        lq = torch.log_softmax(lm.lm_head(lm.transformer.ln_f(x)), -1).double()
        lp = torch.log_softmax(logits_orig, -1).double()
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert metrics["kl"] == pytest.approx(kl, rel=1e-3)


def test_bdec_alone_recovers_nothing_and_a_perfect_reconstruction_everything(run_dir):
    """x_hat = b_dec (every feature silent) recovers ~0 of the loss against mean ablation,
    though a part against zero ablation (bias-free LM); an exact x_hat recovers 1, KL 0."""
    cfg = run_dir["cfg"]
    lm = store.load_lm(cfg.out)
    inputs = train_sae.check_inputs(cfg)
    ev = EvalSet(cfg, lm, torch.device("cpu"), 256)
    silent = SparseAutoencoder(128, 256, 1e-3)
    with torch.no_grad():
        silent.b_enc.fill_(-1e4)  # no feature ever fires
        silent.b_dec.copy_(torch.from_numpy(inputs["mean"]).float())
    m, density = ev.evaluate(silent, inputs["mean"])
    assert m["l0"] == 0 and (density == 0).all() and m["dead_eval"] == 256
    assert m["L_bdec"] == pytest.approx(m["L_sae"]) == pytest.approx(m["L_mean"], rel=1e-6)
    assert abs(m["loss_recovered_mean"]) < 1e-4
    # zero ablation credits the input-independent part b_dec reproduces (0.22 here)
    assert m["loss_recovered"] > 0.1
    # b_dec at the geometric median of training rows (the SAE's init) is no better
    rows = next(iter(ActsReader(cfg.out, 512, seed=cfg.seed, max_rows=512)))
    silent.init_b_dec_(rows)
    m = ev.evaluate(silent)[0]
    assert abs(m["loss_recovered_mean"]) < 0.25 and m["kl"] > 0.01
    # F = 2H, W_dec = [I; -I]: f = (relu(x), relu(-x)), x_hat = x exactly
    exact = SparseAutoencoder(128, 256, 1e-3)
    eye = torch.eye(128)
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        exact.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    m = ev.evaluate(exact)[0]
    assert m["mse"] == 0 and m["L_sae"] == pytest.approx(m["L_orig"], rel=1e-6)
    assert m["loss_recovered_mean"] == pytest.approx(1, abs=1e-5)
    assert m["loss_recovered"] == pytest.approx(1, abs=1e-5)
    assert m["ce_increase"] == pytest.approx(0, abs=1e-5) and abs(m["kl"]) < 1e-6


def test_eval_contexts_are_a_seeded_sample_shared_by_a_sweep(run_dir, straight):
    cfg = run_dir["cfg"]
    ids = eval_contexts(cfg.seed, 1000, 64)
    assert len(set(ids.tolist())) == 64 and ids.max() < 1000
    assert not np.array_equal(ids, np.arange(64)), "a sample, not the first N"
    np.testing.assert_array_equal(ids, eval_contexts(cfg.seed, 1000, 64))
    assert not np.array_equal(ids, eval_contexts(cfg.seed + 1, 1000, 64))
    # trials of a sweep differ in SaeConfig fields only: the same eval contexts
    lm = store.load_lm(cfg.out)
    sets = [EvalSet(make_cfg(cfg.out, **kw), lm, torch.device("cpu"), 512)
            for kw in ({}, {"l1_coeff": 1e-2, "lr": 1e-4}, {"n_features": 1024})]
    assert not np.array_equal(sets[0].ctx, np.arange(EVAL_CTX))
    for other in sets[1:]:
        np.testing.assert_array_equal(other.ctx, sets[0].ctx)
        assert torch.equal(other.acts, sets[0].acts)
    history = json.loads(open(os.path.join(straight["workdir"], "history.json")).read())
    assert history[0]["eval_tokens"] == EVAL_CTX * T


def test_export_round_trips_and_sae_lens_layout(straight):
    export = os.path.join(straight["workdir"], "sae")
    sae, info = sae_files.load_sae(export)
    assert_same_weights({k: v for k, v in sae.state_dict().items()}, straight["weights"])
    assert info["d_in"] == 128 and info["n_features"] == 512 and info["sae"]["l1_coeff"] == 3e-3
    assert info["hook_point"] == "blocks.0.mlp.hook_post" and len(info["acts_sha256"]) == 64
    lens_dir = os.path.join(export, "sae_lens")
    cfg = json.loads(open(os.path.join(lens_dir, "cfg.json")).read())
    assert cfg | {"model_name": None, "dataset_path": None} == cfg | {
        "architecture": "standard", "d_in": 128, "d_sae": 512, "apply_b_dec_to_input": True,
        "dtype": "float32", "device": "cpu", "hook_name": "blocks.0.mlp.hook_post",
        "hook_layer": 0, "context_size": T, "normalize_activations": "none",
        "prepend_bos": False, "finetuning_scaling_factor": False,
        "model_name": None, "dataset_path": None}
    assert "sae_lens_version" not in cfg  # SAELens 6 converts the flat pre-6.0 layout
    w = safetensors.torch.load_file(os.path.join(lens_dir, "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "W_enc": (128, 512), "W_dec": (512, 128), "b_enc": (512,), "b_dec": (128,)}
    # SAELens's StandardSAE.encode/decode on these tensors reproduce ours
    x = torch.randn(5, 128).abs()
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(f @ w["W_dec"] + w["b_dec"], sae(x).x_hat)


# --- resume --------------------------------------------------------------------------------


def test_resume_halfway_is_bit_identical(straight, run_dir, tmp_path):
    """16 steps, then a fresh call resumes to 32. Step 16 is a resample step but the last
    one of the short run, so the short run leaves it (and its open dead window) to the
    resumed run, which resamples first: the result still equals the straight run's."""
    cfg = run_dir["cfg"]
    workdir = str(tmp_path / "half")
    first = train_sae.train(make_cfg(cfg.out, n_steps=16), workdir)
    half = json.loads(open(os.path.join(workdir, "checkpoint", "state.json")).read())
    assert first["step"] == 16 and first["n_resampled"] == 0
    assert half["window_open"] and half["last_resample"] == 0
    assert first == {**straight["state"]["history"][1], "wall_s": first["wall_s"],
                     "eval_s": first["eval_s"], "samples_per_s": first["samples_per_s"]}
    steps = []
    final = train_sae.train(cfg, workdir, on_eval=lambda m, p: steps.append(m["step"]))
    assert steps == [24, 32]
    ckpt = os.path.join(workdir, "checkpoint")
    assert_same_weights(safetensors.torch.load_file(os.path.join(ckpt, "sae.safetensors")),
                        straight["weights"])
    state = json.loads(open(os.path.join(ckpt, "state.json")).read())
    assert state["reader"] == straight["state"]["reader"]
    assert state["rng"] == straight["state"]["rng"]
    assert_same_weights(
        safetensors.torch.load_file(os.path.join(ckpt, "trainer.safetensors")),
        safetensors.torch.load_file(os.path.join(straight["workdir"], "checkpoint",
                                                 "trainer.safetensors")))
    for k in ("loss_recovered", "l0", "mse", "dead", "n_resampled"):
        assert final[k] == straight["metrics"][k]


def test_fault_switch_fails_once_and_the_retry_resumes(straight, run_dir, tmp_path,
                                                      monkeypatch):
    """Fail right after step 22: the retry resumes from the step-20 checkpoint (a plain
    checkpoint_interval one, after the resample at 16 and the fired-mask reset at 22 is
    still to come), not from step 0, and ends bit-identical to the straight run."""
    cfg, marker = run_dir["cfg"], tmp_path / "failed"
    workdir = str(tmp_path / "faulty")
    monkeypatch.setenv(train_sae.FAIL_AT_ENV, f"22:{marker}")
    with pytest.raises(RuntimeError, match="injected failure"):
        train_sae.train(cfg, workdir)
    assert marker.exists()
    state = json.loads(open(os.path.join(workdir, "checkpoint", "state.json")).read())
    assert state["step"] == 20 and state["n_resampled"] > 0
    steps = []
    train_sae.train(cfg, workdir, on_eval=lambda m, p: steps.append(m["step"]))
    assert steps == [24, 32]
    assert_same_weights(
        safetensors.torch.load_file(os.path.join(workdir, "checkpoint", "sae.safetensors")),
        straight["weights"])


def test_finished_run_resumes_to_its_export(straight, run_dir, tmp_path):
    workdir = str(tmp_path / "again")
    shutil.copytree(straight["workdir"], workdir)
    shutil.rmtree(os.path.join(workdir, "sae"))
    calls = []
    m = train_sae.train(run_dir["cfg"], workdir, on_eval=lambda *a: calls.append(a))
    assert calls == [] and m == straight["metrics"]
    sae, _ = sae_files.load_sae(os.path.join(workdir, "sae"))
    assert_same_weights(sae.state_dict(), straight["weights"])


def test_crash_between_checkpoint_renames_falls_back_to_the_previous(straight, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(os.path.join(straight["workdir"], "checkpoint"), workdir / "checkpoint.prev")
    (workdir / "checkpoint.tmp-deadbeef").mkdir()
    assert sae_files.latest_checkpoint(str(workdir)) == str(workdir / "checkpoint.prev")
    assert not (workdir / "checkpoint.tmp-deadbeef").exists()


# --- bad input -----------------------------------------------------------------------------


def test_width_mismatch_is_refused(run_dir, straight, tmp_path):
    cfg = run_dir["cfg"]
    with pytest.raises(ValueError, match="128 wide, but lm.d_mlp is 64"):
        train_sae.train(with_overrides(cfg, lm={"d_mlp": 64}), str(tmp_path / "w"))
    with pytest.raises(ValueError, match=r"sae.n_features=512 \(now 128\)"):
        train_sae.train(make_cfg(cfg.out, n_features=128), str(tmp_path / "w2"),
                        resume_from=os.path.join(straight["workdir"], "checkpoint"))
    with pytest.raises(ValueError, match=r"sae.l1_coeff=0.003 \(now 0.1\)"):
        train_sae.train(make_cfg(cfg.out, l1_coeff=0.1), str(tmp_path / "w3"),
                        resume_from=os.path.join(straight["workdir"], "checkpoint"))


def test_corrupt_checkpoint_is_refused(run_dir, straight, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(os.path.join(straight["workdir"], "checkpoint"), workdir / "checkpoint")
    path = workdir / "checkpoint" / "sae.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable SAE checkpoint"):
        train_sae.train(run_dir["cfg"], str(workdir))
    (workdir / "checkpoint" / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable SAE checkpoint"):
        train_sae.train(run_dir["cfg"], str(workdir))


def test_nan_activations_are_named(run_dir, tmp_path):
    out = tmp_path / "nan_run"
    shutil.copytree(run_dir["out"], out, ignore=shutil.ignore_patterns("sae_single", "cache"))
    shard = store.acts_files(str(out))[1]
    table = pq.read_table(shard)
    ctx, pos, token, x = store.table_acts(table)
    x = x.copy()
    x[::7] = np.nan
    meta = {k.decode()[5:]: v.decode() for k, v in table.schema.metadata.items()}
    store.write_acts_shard(shard, store.acts_table(ctx, pos, token, x, "float16", meta),
                           "zstd", 256)
    cfg = dataclasses.replace(run_dir["cfg"], out=str(out))
    with pytest.raises(ValueError, match="NaN/Inf"):
        train_sae.train(cfg, str(out / "w"))


def test_steps_beyond_one_pass_repeat_the_data_with_a_warning(caplog):
    sc = PRESETS["tiny"].sae
    assert train_sae.plan_steps(dataclasses.replace(sc, n_steps=0, batch_size=100), 1050) == \
        (10, 1)
    assert train_sae.plan_steps(dataclasses.replace(sc, n_steps=4, batch_size=100), 1050) == \
        (4, 1)
    with caplog.at_level("WARNING", logger="mono.train_sae"):
        assert train_sae.plan_steps(dataclasses.replace(sc, n_steps=25, batch_size=100),
                                    1050) == (25, 0)
    assert "rows repeat" in caplog.text


# --- schedules -----------------------------------------------------------------------------


def test_overlapping_dead_windows_each_start_after_the_previous_resample(run_dir, tmp_path,
                                                                         caplog):
    """dead_window 8 > the gap 12 -> 16: the second window opens right after the resample at
    12 (it used to truncate the first and crash at 16). A run cut at 14, inside that window,
    resumes to the straight run's weights."""
    cfg = make_cfg(run_dir["cfg"].out, resample_at=(12, 16), dead_window=8)
    assert cfg.sae.window_starts == (4, 12)
    with caplog.at_level("INFO", logger="mono.train_sae"):
        straight = train_sae.train(cfg, str(tmp_path / "straight"))
    assert "longer than the gap before the resamples at [16]" in caplog.text
    assert "SAE step 12: resampled" in caplog.text and "SAE step 16: resampled" in caplog.text
    assert straight["step"] == 32 and straight["n_resampled"] > 0
    workdir = str(tmp_path / "cut")
    train_sae.train(make_cfg(cfg.out, resample_at=(12, 16), dead_window=8, n_steps=14),
                    workdir)
    state = json.loads(open(os.path.join(workdir, "checkpoint", "state.json")).read())
    assert state["window_open"] and state["last_resample"] == 12
    resumed = train_sae.train(cfg, workdir)
    assert_same_weights(
        safetensors.torch.load_file(os.path.join(workdir, "checkpoint", "sae.safetensors")),
        safetensors.torch.load_file(os.path.join(tmp_path / "straight", "checkpoint",
                                                 "sae.safetensors")))
    assert resumed["n_resampled"] == straight["n_resampled"]


def test_resample_steps_at_or_past_the_end_warn(caplog):
    sc = dataclasses.replace(PRESETS["tiny"].sae, resample_at=(8, 16, 40), dead_window=4)
    with caplog.at_level("WARNING", logger="mono.train_sae"):
        warned = train_sae.check_schedule(sc, 16)
    assert len(warned) == 1 and "[16, 40] are at or past this run's last step 16" in caplog.text
    assert train_sae.check_schedule(sc, 41) == []
    assert dataclasses.replace(sc, dead_window=10).window_starts == (0, 8, 30)
