"""ray_jobs.pipeline: every stage that exists, chained on the tiny preset (job-smoke tier).

The chain grows as stages land: the test asserts the artifacts of each stage that ran, and
that the chain stopped exactly at the first stage whose module is missing.
"""

import dataclasses
import random
import time

import pytest

from mono import store
from mono.config import PRESETS, Config
from ray_jobs import pipeline

WORDS = ("the a sparse feature fires on token context neuron layer model learns dictionary "
         "autoencoder activation residual stream attention head superposition monosemantic "
         "interpretable basis direction weight decoder encoder loss").split()


def _corpus(path, n_docs=64, seed=0):
    """64 documents of ~300 words: enough for the tiny preset's 256 train contexts of 64."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(6, 16))).capitalize()
                     + "." for _ in range(rng.randrange(25, 40))]
        docs.append(" ".join(sentences))
    path.write_text("\n\n".join(docs))   # blank lines separate documents
    return path


def _stub_stages(monkeypatch, present: set[str]):
    """Pretend only `present` stage modules exist (without input checks); each records its
    call and the cfg."""
    calls = []

    def fake_run(module):
        def run(cfg):
            calls.append((module, cfg))
        return run

    monkeypatch.setattr(pipeline, "_stage_run",
                        lambda module: fake_run(module) if module in present else None)
    monkeypatch.setattr(pipeline, "_stage_check", lambda module: None)
    return calls


def test_pipeline_overrides_reach_every_section(tmp_path, monkeypatch):
    calls = _stub_stages(monkeypatch, {"tokens", "train_lm"})
    out = tmp_path / "run"
    pipeline.main(["--preset", "tiny", "--out", str(out), "--lr", "1e-2",
                   "--sae.lr", "5e-4", "--sweep.lr", "1e-4", "3e-4",
                   "--sweep.l1_coeff", "2e-3", "--corpus", "x.txt"])
    cfg = Config.load(store.Layout(str(out)).cfg)   # written before any stage ran
    assert cfg.train_lm.lr == 1e-2 and cfg.sae.lr == 5e-4   # bare --lr: train_lm's
    assert cfg.sweep.lr == (1e-4, 3e-4) and cfg.sweep.l1_coeff == (2e-3,)
    assert cfg.tokens.corpus == "x.txt"
    assert cfg.sae == dataclasses.replace(PRESETS["tiny"].sae, lr=5e-4)
    assert [m for m, _ in calls] == ["tokens", "train_lm"] and calls[0][1] == cfg


def test_pipeline_stops_at_the_first_missing_stage(tmp_path, monkeypatch, capsys):
    # acts missing: sweep and features must not run even though they "exist".
    calls = _stub_stages(monkeypatch, {"tokens", "train_lm", "sweep", "features"})
    results = pipeline.main(["--preset", "tiny", "--out", str(tmp_path / "run")])
    assert [m for m, _ in calls] == ["tokens", "train_lm"]
    assert [r["ran"] for r in results] == [True, True, False, False, False, False]
    assert [r.get("why") for r in results[2:]] == [
        "mono.acts.run not written yet", "needs mono.acts.run", "needs mono.acts.run",
        "needs mono.acts.run"]
    text = capsys.readouterr().out
    assert "=== summary:" in text and "not run: mono.acts.run not written yet" in text


def test_pipeline_default_is_the_demo_preset(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _stub_stages(monkeypatch, set())
    pipeline.main([])
    saved = Config.load(tmp_path / "runs" / "demo" / "cfg.json")
    assert saved == dataclasses.replace(PRESETS["demo"], out=str(tmp_path / "runs" / "demo"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_tiny_runs_every_existing_stage(ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    corpus = _corpus(tmp_path / "corpus.txt")
    t0 = time.perf_counter()
    results = pipeline.main(["--preset", "tiny", "--out", str(out), "--corpus", str(corpus)])
    wall = time.perf_counter() - t0
    ran = {r["stage"]: r for r in results if r["ran"]}
    assert "tokenize" in ran   # mono.tokens has landed
    # The chain is a prefix: nothing runs after a missing stage.
    flags = [r["ran"] for r in results]
    assert flags == sorted(flags, reverse=True)
    layout = store.Layout(str(out))
    assert Config.load(layout.cfg).tokens.corpus == str(corpus)

    tiny = PRESETS["tiny"]
    manifest = store.tokens_manifest(str(out))
    assert manifest["ctx_len"] == tiny.tokens.ctx_len
    assert manifest["rows"]["train"] >= tiny.acts.n_contexts
    if "train_lm" in ran:
        assert (out / "lm" / "model.safetensors").stat().st_size > 0
    if "collect_acts" in ran:
        acts = store.read_json(layout.acts_manifest)
        n_contexts = tiny.acts.n_contexts or manifest["rows"]["train"]   # 0 = all
        assert acts["rows"] == n_contexts * tiny.acts.tokens_per_context
        assert store.list_files(layout.acts)
    if "sweep_sae" in ran:
        saes = list((out / "sweep").rglob("sae.safetensors"))
        assert len(saes) >= len(tiny.sweep.l1_coeff) * len(tiny.sweep.lr)   # one per trial
    if "analyze" in ran:
        assert list((out / "analysis").rglob("html/index.html"))
    for r in ran.values():
        assert r["files"] > 0 and r["bytes"] > 0, r

    text = capsys.readouterr().out
    assert "=== summary:" in text and "\ntotal " in text
    timings = ", ".join(f"{s} {r['seconds']:.1f} s" for s, r in ran.items())
    print(f"tiny pipeline: {wall:.1f} s ({timings})")
