"""Stage 4: packed SAEs on one stream (mono.pack) against separate train_sae runs.

Reuses test_train_sae's module fixture (a tiny run dir: synthetic tokens, a trained LM,
activation shards, no Ray) and its SAE settings: 32 steps of 128 rows, resampling at 16
and 28, evals every 8, checkpoints every 4.
"""

import json
import os

import pytest
import safetensors.torch
import torch
from test_train_sae import assert_same_weights, make_cfg, run_dir  # noqa: F401  (fixture)

from mono import pack, sae_files, train_sae
from mono.sae import SparseAutoencoder, Trainer

A, B = {"l1_coeff": 3e-3, "lr": 3e-3}, {"l1_coeff": 1e-2, "lr": 1e-3}
VOLATILE = {"wall_s", "eval_s", "samples_per_s"}   # timings differ between any two runs


def weights(workdir: str) -> dict:
    return safetensors.torch.load_file(os.path.join(workdir, "checkpoint", "sae.safetensors"))


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def separate(run_dir, tmp_path_factory):  # noqa: F811
    """Each member trained alone by train_sae."""
    root = tmp_path_factory.mktemp("separate")
    out = {}
    for m in (A, B):
        workdir = str(root / pack.member_name(m))
        out[pack.member_name(m)] = (train_sae.train(make_cfg(run_dir["out"], **m), workdir),
                                    workdir)
    return out


@pytest.fixture(scope="module")
def packed(run_dir, tmp_path_factory):  # noqa: F811
    workdir = str(tmp_path_factory.mktemp("pack"))
    reports = []
    status = pack.train_pack(make_cfg(run_dir["out"]), [A, B], workdir,
                             on_report=lambda n, r, p: reports.append((n, r["step"], p)))
    return {"status": status, "workdir": workdir, "reports": reports}


def test_batched_grads_match_the_per_sae_step():
    torch.manual_seed(0)
    H, F, N = 16, 48, 64
    saes = [SparseAutoencoder(H, F, l1, dtype=torch.float64) for l1 in (1e-3, 1e-2, 3e-2)]
    for sae in saes:   # distinct, trained-looking weights
        for p in sae.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(N, H, dtype=torch.float64).abs()
    stacks = [torch.stack([getattr(s, p).data for s in saes]) for p in pack.PARAMS]
    l1 = torch.tensor([s.l1_coeff for s in saes], dtype=torch.float64)
    grads, stats, counts = pack.batched_grads(*stacks, l1, x)
    for k, sae in enumerate(saes):
        trainer = Trainer(sae, 1e-3, path="dense")
        want = trainer.compute_grads(x)
        for p in pack.PARAMS:
            torch.testing.assert_close(grads[p][k], trainer.grads[p])
        for field in ("loss", "mse", "l1", "l0"):
            torch.testing.assert_close(getattr(stats[k], field), getattr(want, field))
        torch.testing.assert_close(counts[k], trainer.fire_counts)


@pytest.mark.slow
def test_a_pack_equals_separate_runs(packed, separate):
    assert {n: s["status"] for n, s in packed["status"].items()} == {
        pack.member_name(A): "done", pack.member_name(B): "done"}
    for name, (metrics, workdir) in separate.items():
        got = packed["status"][name]
        assert got["dir"] == os.path.join(packed["workdir"], name)
        assert_same_weights(weights(got["dir"]), weights(workdir))
        assert stable(got["metrics"]) == stable(metrics)
        history = json.load(open(os.path.join(got["dir"], "history.json")))
        alone = json.load(open(os.path.join(workdir, "history.json")))
        assert [stable(h) for h in history] == [stable(h) for h in alone]
        sae, info = sae_files.load_sae(os.path.join(got["dir"], "sae"))
        assert_same_weights(sae.state_dict(), weights(workdir))
        assert info["l1_coeff"] == metrics_l1(name)
        assert os.path.isfile(os.path.join(got["dir"], "sae", "sae_lens",
                                           "sae_weights.safetensors"))
    # every member reports on its own (every 4 steps: tiny's report_interval)
    steps = [s for n, s, _ in packed["reports"] if n == pack.member_name(A)]
    assert steps == list(range(4, 33, 4))


def metrics_l1(name: str) -> float:
    return next(m["l1_coeff"] for m in (A, B) if pack.member_name(m) == name)


@pytest.mark.slow
def test_a_batched_pack_matches_separate_runs_within_float_tolerance(run_dir, tmp_path):  # noqa: F811
    """The batched step (stacked weights, bmm) on CPU, 16 steps without resampling, against
    each member alone (its dense/sparse step): the same maths summed in another order."""
    cfg = make_cfg(run_dir["out"], n_steps=16, resample_at=())
    status = pack.train_pack(cfg, [A, B], str(tmp_path / "pack"), batched=True)
    for m in (A, B):
        alone = str(tmp_path / pack.member_name(m))
        metrics = train_sae.train(make_cfg(run_dir["out"], n_steps=16, resample_at=(), **m),
                                  alone)
        got = status[pack.member_name(m)]
        for k, v in weights(got["dir"]).items():
            torch.testing.assert_close(v, weights(alone)[k], rtol=1e-4, atol=1e-5)
        for k in ("l0", "mse", "loss_recovered", "explained_variance"):
            assert got["metrics"][k] == pytest.approx(metrics[k], rel=1e-3, abs=1e-5)


@pytest.mark.slow
def test_an_interrupted_pack_resumes_exactly(run_dir, packed, tmp_path, monkeypatch):  # noqa: F811
    """A crash at step 22 (after the resample at 16) resumes from the members' step-20
    checkpoints; a member added later (B, from step 0, while A stands at 24) catches up
    on the same stream. Both end equal to the uninterrupted pack."""
    cfg = make_cfg(run_dir["out"])
    workdir = str(tmp_path / "crashed")
    monkeypatch.setenv(train_sae.FAIL_AT_ENV, f"22:{tmp_path / 'marker'}")
    with pytest.raises(RuntimeError, match="injected failure"):
        pack.train_pack(cfg, [A, B], workdir)
    monkeypatch.delenv(train_sae.FAIL_AT_ENV)
    assert pack.read_status(workdir, [A, B]) == {pack.member_name(A): "unfinished",
                                                 pack.member_name(B): "unfinished"}
    pack.train_pack(cfg, [A, B], workdir)
    uneven = str(tmp_path / "uneven")
    pack.train_pack(make_cfg(run_dir["out"], n_steps=24), [A], uneven)
    pack.train_pack(cfg, [A, B], uneven)
    for m in (A, B):
        want = weights(os.path.join(packed["workdir"], pack.member_name(m)))
        for d in (workdir, uneven):
            assert_same_weights(weights(os.path.join(d, pack.member_name(m))), want)


@pytest.mark.slow
def test_a_diverging_member_fails_alone(run_dir, packed, tmp_path):  # noqa: F811
    cfg = make_cfg(run_dir["out"])
    workdir = str(tmp_path / "nan")
    p = pack.Pack(cfg, [A, B], workdir)
    bad = pack.member_name(B)

    def poison(name, result, path):
        if name == bad and result["step"] == 8:   # B's weights turn NaN: its next loss is NaN
            p.runs[bad].sae.W_enc.data[0, 0] = float("nan")

    p.fit(poison)
    status = p.finish()
    assert status[bad]["status"] == "failed" and status[bad]["step"] == 9
    assert "training diverged" in status[bad]["error"]
    assert pack.read_status(workdir, [A, B]) == {pack.member_name(A): "done", bad: "failed"}
    assert_same_weights(weights(os.path.join(workdir, pack.member_name(A))),
                        weights(os.path.join(packed["workdir"], pack.member_name(A))))
    # a resumed pack leaves the failed member out and has nothing left to do
    again = pack.train_pack(cfg, [A, B], workdir)
    assert again[bad]["status"] == "failed" and again[pack.member_name(A)]["status"] == "done"


def test_a_pack_samples_b_dec_and_finds_its_shards_once(run_dir, tmp_path, monkeypatch):  # noqa: F811
    """Fresh members share the first one's shard list and initial b_dec (a copy, not its
    storage) instead of each reading the geometric-median sample and the manifest again."""
    calls = {"b_dec": 0, "shards": 0}
    init_b_dec, local_shards = train_sae.SaeRun._init_b_dec, train_sae.local_shards

    def counted_init(self):
        calls["b_dec"] += 1
        init_b_dec(self)

    def counted_shards(source):
        calls["shards"] += 1
        return local_shards(source)

    monkeypatch.setattr(train_sae.SaeRun, "_init_b_dec", counted_init)
    monkeypatch.setattr(train_sae, "local_shards", counted_shards)
    C = {"l1_coeff": 3e-2, "lr": 3e-3}
    p = pack.Pack(make_cfg(run_dir["out"]), [A, B, C], str(tmp_path / "pack"))
    assert calls == {"b_dec": 1, "shards": 1}
    first, *rest = p.runs.values()
    alone = train_sae.SaeRun(make_cfg(run_dir["out"], **C), str(tmp_path / "alone"), None,
                             None, first.evalset, first.inputs)
    for run in rest:
        assert run.shards == first.shards
        assert torch.equal(run.sae.b_dec, alone.sae.b_dec)
        assert run.sae.b_dec.data_ptr() != first.sae.b_dec.data_ptr()
