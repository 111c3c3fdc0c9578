"""Stage 5: mono.features against brute force on a tiny real run, plus its pieces in isolation.

The run: token shards of a corpus with emoji, CJK and HTML/JS injection strings (GPT-2
splits the multi-byte characters across tokens), a random tiny LM (store.save_lm),
activation shards from mono.acts.run, and a random SAE exported as train_sae exports it
(cfg.json + sae.safetensors) under <out>/sae_single/sae. Brute force encodes every row of
the shards with torch and compares.
"""

import json
import os
import random
import tracemalloc

import numpy as np
import pytest
import safetensors.torch
import torch
from test_pages import check_page_is_inert

from mono import acts, features, pages, reader, scan, store
from mono.config import PRESETS, with_overrides
from mono.lm import Lm
from mono.sae import SparseAutoencoder
from mono.tokens import encode_documents, gpt2
from ray_jobs import analyze

T = 64  # the tiny preset's ctx_len
F = 48
SENTENCES = (
    "Emoji 😀 and 🎉 at the party, then CJK 世界 你好 日本語のテキスト and Ünïcödé.",
    '<script>alert(1)</script> then "><img src=x onerror=alert(1)> and </textarea> end.',
    "The sparse feature fires on the token in context; the model learns a dictionary.",
    "Line one\nline two\n\tindented 🚀 rocket 火箭 and more ✓ checks.",
)


def write_corpus_tokens(out: str, n_docs: int = 60, seed: int = 0,
                        rows_per_file: int = 24) -> np.ndarray:
    """Token shards + manifest (stage 1's format) of a multi-byte, HTML-laden corpus;
    returns the (n_ctx, T) ids."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randrange(2, 6)))
            for _ in range(n_docs)]
    flat = encode_documents(docs, gpt2())
    tokens = flat[:len(flat) // T * T].reshape(-1, T).astype(np.int64)
    files = []
    for first in range(0, len(tokens), rows_per_file):
        name = f"part-{len(files):05d}.parquet"
        rows = tokens[first:first + rows_per_file]
        store.write_table_atomic(store.join(store.Layout(out).tokens("train"), name),
                                 store.token_table(np.arange(first, first + len(rows)), rows))
        files.append({"name": name, "first": first, "rows": len(rows)})
    store.write_json(store.Layout(out).tokens_manifest, {
        "ctx_len": T, "rows": {"train": len(tokens), "val": 0},
        "splits": {"train": {"rows": len(tokens), "files": files},
                   "val": {"rows": 0, "files": []}}})
    return tokens


def make_sae(d_in: int, n_features: int = F, seed: int = 0, bias=None) -> SparseAutoencoder:
    sae = SparseAutoencoder(d_in, n_features, 1e-3, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.W_enc.mul_(40.0)  # the tiny LM's activations are small: make features fire
        if bias is not None:
            sae.b_enc.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return sae


def write_sae(sae_dir: str, d_in: int, n_features: int = F, seed: int = 0,
              bias=None) -> SparseAutoencoder:
    """A random SAE in train_sae's export format (cfg.json + sae.safetensors)."""
    sae = make_sae(d_in, n_features, seed, bias)
    os.makedirs(sae_dir, exist_ok=True)
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()},
                                os.path.join(sae_dir, "sae.safetensors"))
    store.write_json(os.path.join(sae_dir, "cfg.json"),
                     {"format": "mono.sae/1", "d_in": d_in, "n_features": n_features,
                      "l1_coeff": 1e-3})
    return sae


def design_bias(out: str, d_in: int) -> np.ndarray:
    """b_enc giving a spread of densities on these shards: features 0-3 dead, 4-7 active on
    exactly 1-4 rows (fewer than top_k), the rest active on 0.3% .. 30% of the rows."""
    x = np.concatenate([store.table_acts(store.read_table(p), float32=True)[3]
                        for p in store.acts_files(out)])
    with torch.no_grad():
        pre = (torch.from_numpy(x) @ make_sae(d_in).W_enc).numpy()       # (N, F), b = 0
    desc = -np.sort(-pre, axis=0)                                        # (N, F)
    bias = np.empty(F, dtype=np.float32)
    bias[:4] = -desc[0, :4] - 1.0
    for i, c in zip(range(4, 8), range(1, 5)):
        bias[i] = -(desc[c - 1, i] + desc[c, i]) / 2
    ranks = np.geomspace(0.003, 0.3, F - 8) * len(x)
    bias[8:] = [-desc[int(r), i] for i, r in zip(range(8, F), ranks)]
    return bias


def tiny_cfg(out, **analysis):
    settings = {"n_tasks": 3, "batch_rows": 100} | analysis
    return with_overrides(PRESETS["tiny"], out=str(out), acts={"max_actors": 2},
                          analysis=settings)


def brute_force(out: str, sae: SparseAutoencoder) -> dict:
    """Every row of the shards (plain pyarrow) and its features f (N, F)."""
    parts = [store.table_acts(store.read_table(p), float32=True) for p in store.acts_files(out)]
    ctx, pos, token, x = (np.concatenate([p[i] for p in parts]) for i in range(4))
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x)).numpy()
    return {"ctx": ctx, "pos": pos, "token": token, "f": f}


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("analysis_run"))
    tokens = write_corpus_tokens(out)
    cfg = tiny_cfg(out)
    torch.manual_seed(0)
    store.save_lm(store.Layout(out).lm, Lm(cfg.lm).eval(), cfg)
    acts.run(cfg)
    sae_dir = os.path.join(out, "sae_single", "sae")
    sae = write_sae(sae_dir, cfg.lm.d_mlp, bias=design_bias(out, cfg.lm.d_mlp))
    summary = analyze.main(["--preset", "tiny", "--out", out, "--n_tasks", "3",
                            "--batch_rows", "100"])
    adir = store.Layout(out).analysis("sae_single")
    rows, examples, saved = pages.read_tables(adir)
    return {"out": out, "cfg": cfg, "tokens": tokens, "sae": sae, "summary": summary,
            "rows": rows, "examples": examples, "saved": saved, "adir": adir,
            "brute": brute_force(out, sae)}


# --- against brute force ------------------------------------------------------------------


def test_top_k_and_density_equal_brute_force(run):
    b, a = run["brute"], run["cfg"].analysis
    f = b["f"]                                                           # (N, F)
    where = {(int(c), int(p)): j for j, (c, p) in enumerate(zip(b["ctx"], b["pos"]))}
    assert run["summary"]["rows"] == len(f) and run["summary"]["tasks"] == 3
    counts = (f > 0).sum(0)
    assert 0 < (counts == 0).sum() and 0 < (counts < a.top_k).sum() - (counts == 0).sum()
    assert (counts > a.top_k).sum() > F // 2, "a mix of dead, rare and common features"
    for row, feat in zip(run["rows"], run["examples"]["features"]):
        i = row["feature"]
        density = counts[i] / len(f)
        assert row["count"] == counts[i] and row["density"] == pytest.approx(density)
        assert row["density_class"] == ("dead" if density == 0 else "ultralow"
                                        if density < a.ultralow_density else "dense"
                                        if density > a.dense_density else "low")
        want = np.sort(f[:, i])[::-1][:a.top_k]
        want = want[want > 0]                                            # positives only
        got = np.array([e["act"] for e in feat["top"]])
        assert len(got) == len(want) == min(a.top_k, counts[i])          # no zeros (seed bug)
        np.testing.assert_allclose(got, want, rtol=1e-4)
        for e in feat["top"]:                                            # the right (ctx, pos)
            assert f[where[(e["ctx"], e["pos"])], i] == pytest.approx(e["act"], rel=1e-4)
        assert len({(e["ctx"], e["pos"]) for e in feat["top"]}) == len(got)
        assert row["max_act"] == pytest.approx(f[:, i].max(), rel=1e-5)
    assert run["summary"]["l0"] == pytest.approx(counts.sum() / len(f))


def test_intervals_and_histogram_equal_brute_force(run):
    a, f = run["cfg"].analysis, run["brute"]["f"]
    where = {(int(c), int(p)): j for j, (c, p) in enumerate(zip(run["brute"]["ctx"],
                                                                run["brute"]["pos"]))}
    for row, feat in zip(run["rows"], run["examples"]["features"]):
        i, v = row["feature"], f[:, row["feature"]]
        v = v[v > 0]
        if not len(v):
            assert sum(row["hist"]) == 0 and not any(feat["intervals"])
            continue
        edges = row["max_act"] * np.arange(1, a.n_intervals) / a.n_intervals
        want = np.bincount(np.searchsorted(edges, v, side="right"), minlength=a.n_intervals)
        assert row["interval_counts"] == want.tolist()                   # value-spaced
        frac = np.minimum((v / row["max_act"] * a.hist_bins).astype(int), a.hist_bins - 1)
        assert row["hist"] == np.bincount(frac, minlength=a.hist_bins).tolist()
        for j, samples in enumerate(feat["intervals"]):
            assert len(samples) == min(a.samples_per_interval, want[j])
            assert len({(e["ctx"], e["pos"]) for e in samples}) == len(samples)
            for e in samples:
                lo = row["max_act"] * j / a.n_intervals
                hi = row["max_act"] * (j + 1) / a.n_intervals
                assert lo * (1 - 1e-5) <= e["act"] <= hi * (1 + 1e-5)  # 6 digits in JSON
                assert e["act"] == pytest.approx(f[where[(e["ctx"], e["pos"])], i], rel=1e-4)


def test_windows_decode_whole_text_around_the_right_token(run):
    enc, tokens, w = gpt2(), run["tokens"], run["cfg"].analysis.window
    raw = open(store.join(run["adir"], "examples.json"), encoding="utf-8").read()
    assert "\ufffd" not in raw and "\\ufffd" not in raw
    widened = 0
    for feat in run["examples"]["features"]:
        for e in feat["top"] + [s for samples in feat["intervals"] for s in samples]:
            pieces = enc.decode_tokens_bytes(tokens[e["ctx"]].tolist())
            own = pieces[e["pos"]]
            before = b"".join(pieces[max(0, e["pos"] - w - 3):e["pos"]])
            after = b"".join(pieces[e["pos"] + 1:e["pos"] + w + 4])
            # left ends where the token's first whole character starts; right starts after
            # its last one; ignore drops exactly the bytes the token's span absorbed.
            assert before.decode("utf-8", errors="ignore").endswith(e["left"])
            assert after.decode("utf-8", errors="ignore").startswith(e["right"])
            assert len(e["left"]) > 0 or e["pos"] == 0 or before.decode(
                "utf-8", errors="ignore") == ""
            # the token's bytes, as text or (a fragment cut by the context's edge) as \xNN
            assert own in e["token"].encode() or \
                own.decode("utf-8", errors="backslashreplace") in e["token"]
            widened += len(own) < len(e["token"].encode())
    assert widened > 0, "some highlighted tokens are parts of multi-byte characters"


def test_decode_window_exact_cases():
    enc = gpt2()
    ids = np.array(enc.encode_ordinary("Hi 😀 世界 <b>"))
    assert [enc.decode_single_token_bytes(int(t)) for t in ids[:4]] == [
        b"Hi", b" \xf0\x9f\x98", b"\x80", b" "]                          # the emoji is split
    assert features.decode_window(enc, ids, 2, 1) == (" ", "😀", " ")
    assert features.decode_window(enc, ids, 1, 1) == ("Hi", " 😀", "")
    assert features.decode_window(enc, ids, 5, 1) == ("", "世", "界")   # window widened
    assert features.decode_window(enc, ids, 0, 0) == ("", "Hi", "")
    assert features.decode_window(enc, ids[2:], 1, 2) == ("", " ", "世")  # start fragment dropped
    assert features.decode_window(enc, ids[2:], 0, 2) == ("", "\\x80", " 世")  # kept in the token
    assert features.decode_window(enc, ids[:2], 1, 2) == ("Hi", " \\xf0\\x9f\\x98", "")
    assert features.decode_window(enc, ids[:3], 0, 1) == ("", "Hi", " 😀")
    assert "".join(features.decode_window(enc, ids, 4, 20)) == "Hi 😀 世界 <b>"
    text = "Hi 😀 世界 日本語のテキスト 🚀 火箭 ✓ Ünïcödé\n" * 2
    ids = np.array(enc.encode_ordinary(text))
    for w in range(4):                       # every window of contexts cut anywhere
        for lo, hi in ((0, len(ids)), (1, len(ids) - 1), (2, len(ids) - 2), (5, 30)):
            for p in range(hi - lo):
                left, token, right = features.decode_window(enc, ids[lo:hi], p, w)
                assert "\ufffd" not in left + token + right
                assert "\\x" in token or left + token + right in text


# --- bounded memory -----------------------------------------------------------------------


def test_scan_state_does_not_grow_with_rows(run):
    shards = reader.shard_list(run["out"])
    pieces = scan.plan_pieces(shards, 0)
    sae = run["sae"]
    state = {k: v.detach().numpy() for k, v in sae.state_dict().items()}
    common = {"batch_rows": 128, "seed": 0}
    sizes, peaks = {}, {}
    for times in (1, 4):
        tracemalloc.start()
        top = scan.scan(pieces * times, shards["files"], shards["dtype"], state,
                            common | {"kind": "top", "k": 5})
        inter = scan.scan(pieces * times, shards["files"], shards["dtype"], state,
                              common | {"kind": "intervals", "max_act": top.max_act.numpy(),
                                        "n_intervals": 4, "per_interval": 2, "n_bins": 8})
        peaks[times] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        sizes[times] = (top.nbytes(), inter.nbytes())
        assert top.rows == times * len(run["brute"]["f"])
        assert inter.counts.sum() == times * (run["brute"]["f"] > 0).sum()
    assert sizes[1] == sizes[4]
    assert peaks[4] < 1.5 * peaks[1] + 1e6, peaks


def test_plan_pieces_samples_every_shard_in_proportion(run):
    shards = reader.shard_list(run["out"])
    total = sum(shards["rows"])
    pieces = scan.plan_pieces(shards, total // 4)
    per_file = np.bincount([p[0] for p in pieces], weights=[p[2] for p in pieces],
                           minlength=len(shards["files"]))
    np.testing.assert_allclose(per_file, np.array(shards["rows"]) / 4, atol=1)
    groups = scan.split_tasks(scan.plan_pieces(shards, 0), 3)
    assert len(groups) == 3 and sum(len(g) for g in groups) == len(scan.plan_pieces(shards, 0))


def test_max_rows_scans_a_sample(run, tmp_path):
    path = str(tmp_path / "sampled" / "sae")
    write_sae(path, run["cfg"].lm.d_mlp)
    cfg = with_overrides(run["cfg"], analysis={"max_rows": 400, "n_tasks": 2, "trial": path})
    summary = features.run(cfg)
    assert summary["trial"] == "sampled" and summary["tasks"] == 2
    assert 400 <= summary["rows"] <= 400 + len(reader.shard_list(run["out"])["files"])
    assert summary["rows_available"] == len(run["brute"]["f"])


# --- logit effects ------------------------------------------------------------------------


def test_logit_effects_match_the_lms_logit_change(run):
    """A small multiple of a decoder direction added to the MLP output at every position of
    the analysis's contexts changes the LM's logits (central finite difference through the
    real ln_f and unembedding, float64) by the listed effects, rare tokens left out."""
    out, lm = run["out"], store.load_lm(run["out"])
    tokens = store.read_context(out, np.arange(16))
    resid = features.final_residual(lm, tokens)                              # (N, D)
    counts = features.token_counts(out)
    assert counts.sum() == store.read_tokens(out, "train")[1].size
    keep = np.flatnonzero(counts >= run["cfg"].analysis.logit_min_count)
    assert 10 < len(keep) < 1000, "the corpus uses few tokens: most of the vocabulary is rare"
    W_dec = run["sae"].W_dec.detach()[:3]
    top_ids, top_val, bot_ids, bot_val = features.logit_effects(
        lm, W_dec, features.ln_jacobian(lm, resid), 10, keep, chunk=2)
    ln_f, W_U = lm.transformer.ln_f.double(), lm.lm_head.weight.double()[keep]
    c_proj = lm.transformer.h[-1].mlp.c_proj.double()
    x, eps = resid.double(), 1e-3
    with torch.no_grad():
        for i in range(3):
            u = c_proj(W_dec[i].double())                                    # (D,)
            fd = ((ln_f(x + eps * u) - ln_f(x - eps * u)) @ W_U.T).mean(0) / (2 * eps)
            fd = (fd - fd.median()).numpy()                                  # (V',)
            want = keep[np.argsort(-fd)[:10]]
            assert set(top_ids[i]) == set(want) and set(top_ids[i]) <= set(keep)
            got = dict(zip(keep, fd))
            np.testing.assert_allclose(top_val[i], [got[t] for t in top_ids[i]],
                                       rtol=1e-3, atol=1e-4 * abs(fd).max())
            np.testing.assert_allclose(bot_val[i], np.sort(fd)[:10], rtol=1e-3,
                                       atol=1e-4 * abs(fd).max())
    # the analysis's own tables: kept tokens only, and the pages say how many were left out
    assert all(set(r["logit_top_ids"]) | set(r["logit_bottom_ids"]) <= set(keep)
               for r in run["rows"])
    excluded = 50257 - len(keep)
    assert run["saved"]["logit"] == {"positions": len(resid), "min_count": 10,
                                     "excluded": excluded, "vocab": 50257}
    page = open(store.join(run["adir"], "html", "features", "9.html"), encoding="utf-8").read()
    assert f"{excluded:,} of the 50,257 tokens" in page
    table = run["rows"][0]
    assert len(table["logit_top"]) == run["cfg"].analysis.logit_tokens
    assert all("\ufffd" not in t for r in run["rows"] for t in r["logit_top"] + r["logit_bottom"])


# --- choosing the SAE ---------------------------------------------------------------------


def test_best_trial_prefers_the_l0_target_and_falls_back():
    # chosen by the headline (mean ablation), not the paper's zero-ablation figure
    trials = [{"name": "a", "l0": 5, "loss_recovered_mean": 0.6, "loss_recovered": 0.99},
              {"name": "b", "metrics": {"l0": 30, "loss_recovered_mean": 0.9}},
              {"name": "c", "l0": 12, "loss_recovered_mean": 0.7, "loss_recovered": 0.9},
              {"name": "d", "status": "error", "l0": 1, "loss_recovered_mean": 0.99}]
    best, note = features.best_trial(trials, 20)
    assert best["name"] == "c" and "2 trial(s)" in note
    best, note = features.best_trial(trials, 1)
    assert best["name"] == "b" and "no trial has L0 <= 1" in note
    with pytest.raises(ValueError, match="loss_recovered_mean"):
        features.best_trial([{"name": "x", "l0": 1, "loss_recovered": 0.9}], 20)


def test_resolve_trial_from_trials_json_name_and_path(tmp_path):
    out = str(tmp_path)
    cfg = tiny_cfg(out)
    with pytest.raises(FileNotFoundError, match="no SAE to analyse"):
        features.resolve_trial(cfg)
    exp = store.join(out, "sweep", cfg.sweep.name)
    for name in ("t1", "t2"):
        write_sae(store.join(exp, name, "sae"), 8, 4)
    store.write_json(store.join(exp, "trials.json"), {"trials": [
        {"name": "t1", "l0": 3, "loss_recovered_mean": 0.5, "sae_dir": "t1/sae"},
        {"name": "t2", "status": "done", "sae_dir": store.join(exp, "t2", "sae"),
         "metrics": {"l0": 4, "loss_recovered_mean": 0.8}},
        {"name": "t3", "status": "unfinished",
         "last_report": {"l0": 1, "loss_recovered_mean": 1}}]})
    assert features.resolve_trial(cfg)[:2] == ("t2", store.join(exp, "t2", "sae"))
    named = with_overrides(cfg, analysis={"trial": "t1"})
    assert features.resolve_trial(named)[:2] == ("t1", store.join(exp, "t1/sae"))
    by_path = with_overrides(cfg, analysis={"trial": store.join(exp, "t1")})
    assert features.resolve_trial(by_path)[:2] == ("t1", store.join(exp, "t1", "sae"))
    with pytest.raises(ValueError, match="unfinished, not done"):
        features.resolve_trial(with_overrides(cfg, analysis={"trial": "t3"}))
    with pytest.raises(ValueError, match="neither a trial"):
        features.resolve_trial(with_overrides(cfg, analysis={"trial": "nope"}))


def test_bad_sae_raises_before_writing(run, tmp_path):
    for name, d_in, bias in (("wide", 64, None), ("nan", 128, [float("nan")] * F)):
        path = str(tmp_path / name / "sae")
        write_sae(path, d_in, bias=bias)
        cfg = with_overrides(run["cfg"], analysis={"trial": path})
        with pytest.raises(ValueError, match="H=128" if name == "wide" else "NaN"):
            features.run(cfg)
        assert not os.path.exists(store.Layout(run["out"]).analysis(name))


# --- the pages of the run -----------------------------------------------------------------


def test_run_pages_are_complete_and_inert(run):
    html_dir = store.join(run["adir"], "html")
    assert run["summary"]["index"] == store.join(html_dir, "index.html")
    index = open(run["summary"]["index"], encoding="utf-8").read()
    scripts = check_page_is_inert(index).scripts
    data = json.loads(next(body for attrs, body in scripts if attrs.get("type")))
    assert [r[0] for r in data] == list(range(F))
    names = sorted(os.listdir(store.join(html_dir, "features")))
    assert names == sorted(f"{i}.html" for i in range(F))
    seen_injection = False
    for name in names + ["../high_density.html", "../ultra_low_density.html", "../dead.html"]:
        text = open(store.join(html_dir, "features", name), encoding="utf-8").read()
        check_page_is_inert(text)
        seen_injection |= "onerror=alert(1)" in text or "&lt;script&gt;" in text
    assert seen_injection, "the injection strings reached the pages (escaped)"
    assert run["saved"]["classes"]["dead"] >= 4
