"""Stage 3: activation collection (mono.acts) on synthetic token shards and a tiny real LM.

Token shards are written with store.token_table + a manifest, so no tokenizer is needed; the
LM is the tiny preset's shape with random weights, saved with store.save_lm. Ray runs
are few (actor start-up dominates): one baseline collection (through the job's main) shared
by the tests that read it, one resumed rerun, one with an injected actor failure (and, marked
slow, one whose actor process dies). Everything else calls the
Collector and the driver checks directly.
"""

import dataclasses
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mono import acts, store
from mono.config import PRESETS, LmConfig, with_overrides
from mono.lm import Lm
from ray_jobs import collect_acts

T = 64
N_CTX = 200


def write_tokens(out: str, n_ctx: int = N_CTX, ctx_len: int = T, rows_per_file: int = 48,
                 seed: int = 0) -> np.ndarray:
    """Token shards + manifest in the stage-1 format; returns the (n_ctx, T) ids."""
    tokens = np.random.default_rng(seed).integers(0, 50257, (n_ctx, ctx_len))
    files = []
    for first in range(0, n_ctx, rows_per_file):
        name = f"part-{len(files):05d}.parquet"
        rows = tokens[first:first + rows_per_file]
        path = store.join(store.Layout(out).tokens("train"), name)
        store.write_table_atomic(path, store.token_table(np.arange(first, first + len(rows)),
                                                         rows))
        files.append({"name": name, "first": first, "rows": len(rows)})
    store.write_json(store.Layout(out).tokens_manifest, {
        "ctx_len": ctx_len, "rows": {"train": n_ctx, "val": 0},
        "splits": {"train": {"rows": n_ctx, "files": files}, "val": {"rows": 0, "files": []}},
    })
    return tokens


def write_lm(out: str, lm_cfg: LmConfig | None = None, seed: int = 0) -> Lm:
    """A random LM saved as stage 2 saves it (store.save_lm) under <out>/lm/."""
    lm_cfg = lm_cfg or PRESETS["tiny"].lm
    torch.manual_seed(seed)
    model = Lm(lm_cfg).eval()
    cfg = with_overrides(PRESETS["tiny"], out=out, lm=dataclasses.asdict(lm_cfg))
    store.save_lm(store.Layout(out).lm, model, cfg)
    return model


def make_cfg(out, **acts_overrides):
    settings = {"max_actors": 2} | acts_overrides
    return with_overrides(PRESETS["tiny"], out=str(out), acts=settings)


def make_run(out, **acts_overrides):
    tokens = write_tokens(str(out))
    lm = write_lm(str(out))
    return make_cfg(out, **acts_overrides), tokens, lm


def read_all(out) -> dict:
    """Every shard of the manifest with plain pyarrow, sorted by (ctx, pos)."""
    tables = [pq.read_table(f) for f in store.acts_files(str(out))]
    ctx = np.concatenate([t.column("ctx").to_numpy() for t in tables])
    pos = np.concatenate([t.column("pos").to_numpy() for t in tables])
    token = np.concatenate([t.column("token").to_numpy() for t in tables])
    x = np.concatenate([t.column("acts").combine_chunks().to_numpy_ndarray() for t in tables])
    order = np.lexsort((pos, ctx))
    return {"ctx": ctx[order], "pos": pos[order], "token": token[order], "acts": x[order]}


@pytest.fixture(scope="module")
def baseline(ray_local, tmp_path_factory):
    """One collection of the tiny run through the job's main, shared by the tests that
    only read it."""
    out = tmp_path_factory.mktemp("baseline")
    cfg, tokens, lm = make_run(out)
    manifest = collect_acts.main(["--preset", "tiny", "--out", str(out), "--max_actors", "2"])
    return {"out": out, "cfg": cfg, "tokens": tokens, "lm": lm, "manifest": manifest,
            "rows": read_all(out)}


# --- sampling and the Collector (no Ray) ---------------------------------------------


def test_positions_without_replacement_and_independent_of_batching():
    ctx = np.arange(10, 30)
    p = acts.sample_positions(7, ctx, 64, 16)
    assert p.shape == (20, 16) and p.min() >= 0 and p.max() < 64
    assert all(len(set(row)) == 16 for row in p)
    np.testing.assert_array_equal(p[5:8], acts.sample_positions(7, ctx[5:8], 64, 16))
    assert not np.array_equal(p, acts.sample_positions(8, ctx, 64, 16))
    with pytest.raises(ValueError, match="tokens_per_context"):
        acts.sample_positions(0, ctx, 64, 65)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_collector_shard_schema_and_values(tmp_path, dtype):
    cfg, tokens, lm = make_run(tmp_path, dtype=dtype)
    _, settings, _ = acts.check_inputs(cfg)
    row = acts.Collector(cfg.out, settings).collect(64, 64)
    path = store.join(store.Layout(cfg.out).acts, "part-000000064.parquet")
    assert row["rows"] == 64 * 16 and row["bytes"] == os.path.getsize(path)
    table = pq.read_table(path)  # plain pyarrow, no Ray
    storage = {"float16": "halffloat", "bfloat16": "uint16", "float32": "float"}[dtype]
    assert str(table.schema.field("acts").type) == \
        f"extension<arrow.fixed_shape_tensor[value_type={storage}, shape=[128]]>"
    assert [str(table.schema.field(c).type) for c in ("ctx", "pos", "token")] == \
        ["int64", "int16", "int32"]
    assert table.schema.field("acts").metadata[b"mono.dtype"] == dtype.encode()
    assert table.schema.metadata[b"mono.lm_sha256"].decode() == settings["lm_sha256"]
    ctx, pos, token, x = store.table_acts(table, float32=True)
    assert x.dtype == np.float32 and x.shape == (1024, 128)
    assert not np.all(np.diff(ctx) >= 0), "rows are shuffled within the shard"
    assert len(set(zip(ctx.tolist(), pos.tolist()))) == 1024
    np.testing.assert_array_equal(token, tokens[ctx, pos])
    full = lm.mlp_acts(torch.from_numpy(tokens[64:128]))        # every position: (64, T, H)
    ref = full[torch.from_numpy(ctx - 64), torch.from_numpy(pos.astype(np.int64))]
    tol = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5}[dtype]
    torch.testing.assert_close(torch.from_numpy(np.array(x)), ref, rtol=tol, atol=tol)


def test_bad_inputs_raise_before_writing(tmp_path):
    cfg, _, _ = make_run(tmp_path)
    with pytest.raises(ValueError, match=r"d_mlp=128 \(asked 256\)"):
        acts.run(with_overrides(cfg, lm={"d_mlp": 256}))
    with pytest.raises(ValueError, match="n_contexts"):
        acts.run(with_overrides(cfg, acts={"n_contexts": N_CTX + 1}))
    manifest = store.read_json(store.Layout(cfg.out).tokens_manifest)
    store.write_json(store.Layout(cfg.out).tokens_manifest, manifest | {"ctx_len": 8})
    with pytest.raises(ValueError, match=r"tokens_per_context \(16\) > the token shards' "
                                         r"ctx_len \(8\)"):
        acts.run(cfg)
    store.write_json(store.Layout(cfg.out).tokens_manifest, manifest)
    shard = store.join(store.Layout(cfg.out).tokens("train"), "part-00001.parquet")
    with open(shard, "r+b") as f:
        f.truncate(100)  # a corrupt file
    with pytest.raises(ValueError, match="corrupt token shard .*part-00001.parquet"):
        acts.run(cfg)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match="part-00001.parquet"):
        acts.run(cfg)
    store.delete(store.Layout(cfg.out).tokens_manifest)
    with pytest.raises(FileNotFoundError, match="no token manifest"):
        acts.run(cfg)
    assert not store.exists(store.Layout(cfg.out).acts)


def test_refuses_output_of_a_different_lm(tmp_path):
    cfg, _, _ = make_run(tmp_path)
    _, settings, _ = acts.check_inputs(cfg)
    acts.Collector(cfg.out, settings).collect(0, 64)
    shard = store.join(store.Layout(cfg.out).acts, "part-000000000.parquet")
    before = os.path.getmtime(shard)
    write_lm(cfg.out, seed=1)  # retrained LM, same shape
    with pytest.raises(ValueError, match="different LM or settings.*lm_sha256"):
        acts.run(cfg)
    with pytest.raises(ValueError, match="tokens_per_context"):
        acts.run(with_overrides(cfg, acts={"tokens_per_context": 8}))
    assert os.path.getmtime(shard) == before
    # overwrite clears the old shards; the first planned shard is then redone (checked
    # without Ray: existing_state is the driver's resume decision).
    _, new_settings, _ = acts.check_inputs(cfg)
    chunks = acts.plan(N_CTX, 64)
    assert acts.existing_state(with_overrides(cfg, acts={"overwrite": True}), new_settings,
                               chunks) == set()
    assert not os.path.exists(shard)


def test_resume_decision_skips_finished_shards(tmp_path):
    cfg, _, _ = make_run(tmp_path)
    _, settings, _ = acts.check_inputs(cfg)
    collector = acts.Collector(cfg.out, settings)
    collector.collect(0, 64)
    collector.collect(128, 64)
    store.write_bytes_atomic(store.join(store.Layout(cfg.out).acts,
                                        "part-000000064.parquet.tmp-dead"), b"half")
    done = acts.existing_state(cfg, settings, acts.plan(N_CTX, 64))
    assert done == {0, 128}
    assert sorted(os.listdir(store.Layout(cfg.out).acts)) == [
        "part-000000000.parquet", "part-000000128.parquet"]  # the temporary is gone


def test_disk_check(tmp_path, monkeypatch):
    cfg, _, _ = make_run(tmp_path)
    acts.check_disk(cfg, 1000, 128)
    monkeypatch.setattr(acts.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(ValueError, match="not enough disk"):
        acts.check_disk(cfg, 1000, 128)


# --- Ray runs --------------------------------------------------------------------------


def test_refuses_actors_no_node_can_host(ray_local, tmp_path):
    cfg, _, _ = make_run(tmp_path, cpus_per_actor=64)
    with pytest.raises(ValueError, match=r"cpus_per_actor \(64\) > the 4 CPUs"):
        acts.run(cfg)
    assert not os.path.exists(store.Layout(cfg.out).acts)


def test_collect_counts_content_and_manifest(baseline):
    m, rows, cfg = baseline["manifest"], baseline["rows"], baseline["cfg"]
    assert m["rows"] == N_CTX * 16 == len(rows["ctx"])
    assert [f["name"] for f in m["files"]] == [store.acts_shard_name(f) for f in
                                               (0, 64, 128, 192)]
    assert [f["rows"] for f in m["files"]] == [1024, 1024, 1024, 128]
    assert m["completed"] == [[0, 64], [64, 64], [128, 64], [192, 8]]
    assert m["H"] == 128 and m["dtype"] == "float16" and m["tokens_per_context"] == 16
    assert m["lm_sha256"] == acts.lm_checksum(cfg.out) and m["seed"] == cfg.seed
    pairs = rows["ctx"] * T + rows["pos"]
    assert len(np.unique(pairs)) == len(pairs)  # no (ctx, pos) twice
    np.testing.assert_array_equal(np.bincount(rows["ctx"]), np.full(N_CTX, 16))
    np.testing.assert_array_equal(rows["token"], baseline["tokens"][rows["ctx"], rows["pos"]])
    full = baseline["lm"].mlp_acts(torch.from_numpy(baseline["tokens"]))   # (N_CTX, T, H)
    ref = full[torch.from_numpy(rows["ctx"]), torch.from_numpy(rows["pos"].astype(np.int64))]
    torch.testing.assert_close(torch.from_numpy(rows["acts"]).float(), ref, rtol=2e-3,
                               atol=2e-3)


def test_rerun_after_partial_run_resumes_identically(baseline):
    cfg, out = baseline["cfg"], str(baseline["out"])
    files = store.acts_files(out)
    before = {f: open(f, "rb").read() for f in files}
    mtimes = {f: os.path.getmtime(f) for f in files}
    os.remove(files[1])
    store.delete(store.Layout(out).acts_manifest)
    manifest = acts.run(cfg)
    assert manifest["rows"] == baseline["manifest"]["rows"]
    assert {f: open(f, "rb").read() for f in files} == before  # byte-identical
    assert [os.path.getmtime(f) == mtimes[f] for f in files] == [True, False, True, True]


def test_actor_failure_is_retried_and_exact(baseline, tmp_path, monkeypatch):
    cfg, _, _ = make_run(tmp_path / "run")
    (tmp_path / "fault").mkdir()
    monkeypatch.setenv(acts.FAIL_ONCE_ENV, str(tmp_path / "fault"))
    manifest = acts.run(cfg)
    assert (tmp_path / "fault" / "failed").exists()  # the failure did happen
    assert manifest["rows"] == N_CTX * 16
    rows = read_all(cfg.out)
    for k in ("ctx", "pos", "token", "acts"):
        np.testing.assert_array_equal(rows[k], baseline["rows"][k])
    assert not [n for n in os.listdir(store.Layout(cfg.out).acts) if ".tmp-" in n]


@pytest.mark.slow
def test_actor_process_death_is_retried_and_exact(baseline, tmp_path, monkeypatch):
    cfg, _, _ = make_run(tmp_path / "run")
    (tmp_path / "fault").mkdir()
    monkeypatch.setenv(acts.FAIL_ONCE_ENV, str(tmp_path / "fault"))
    monkeypatch.setenv(acts.FAIL_MODE_ENV, "exit")  # os._exit in the actor: Ray restarts it
    manifest = acts.run(cfg)
    assert (tmp_path / "fault" / "failed").exists()
    assert manifest["rows"] == N_CTX * 16
    rows = read_all(cfg.out)
    for k in ("ctx", "pos", "token", "acts"):
        np.testing.assert_array_equal(rows[k], baseline["rows"][k])
