"""Stage 1: the offline GPT-2 tokenizer, corpus sources, the split, and tokens.run on Ray."""

import ast
import json
import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken.load

from mono import store, tokens
from mono.config import TokensConfig, preset, with_overrides
from mono.corpus import (
    SCRIPT_ERROR,
    _docstrings,
    _rows_text,
    embedded_documents,
    iter_documents,
    load_hf,
)
from mono.errors import MissingInput, UserError

WORDS = ("the model reads a token and writes its feature while every neuron in the layer fires "
         "on café naïve 日本語 text 🙂 under sparse dictionary learning").split()


def _doc(i: int, n_words: int) -> str:
    rng = np.random.default_rng(i)
    return f"Document {i}: " + " ".join(rng.choice(WORDS, size=n_words)) + "."


def _write_corpus(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """64 documents of ~40-110 tokens, blank-line separated, in one text file."""
    docs = [_doc(i, 30 + i % 40) for i in range(64)]
    return _write_corpus(tmp_path / "corpus.txt", docs), docs


def _cfg(out, corpus, **tokens_kw):
    kw = {"corpus": str(corpus), "docs_per_block": 16, "rows_per_shard": 8, "max_docs": 0,
          **tokens_kw}
    return with_overrides(preset("tiny"), out=str(out), tokens=kw)


# --- tokenizer -------------------------------------------------------------------------


def test_gpt2_gives_the_real_gpt2_ids():
    enc = tokens.gpt2()
    assert enc is tokens.gpt2()  # cached
    assert enc.n_vocab == 50257
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [tokens.EOT] == [50256]
    assert tokens.EOT not in enc.encode_ordinary("<|endoftext|>")  # ordinary: plain text


@pytest.mark.parametrize("text", ["naïve café, 日本語のテキスト, 🙂🚀 and\ttabs\n\n  ",
                                  "Ελληνικά ✓ العربية \u200b zero-width", ""])
def test_gpt2_round_trips_unicode(text):
    enc = tokens.gpt2()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_gpt2_builds_without_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer touched the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    read = tiktoken.load.read_file
    paths = []
    monkeypatch.setattr(tiktoken.load, "read_file",
                        lambda p: paths.append(p) or (no_network() if "://" in p else read(p)))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: the files are read
    tokens.gpt2.cache_clear()
    try:
        assert tokens.gpt2().encode_ordinary(" the") == [262]
    finally:
        tokens.gpt2.cache_clear()
    assert len(paths) == 2 and all(os.path.isfile(p) for p in paths)


def test_pinned_hashes_are_tiktokens():
    """Our sha256 constants equal the ones tiktoken's own gpt2 constructor checks."""
    import tiktoken_ext.openai_public as public

    tree = ast.parse(Path(public.__file__).read_text())
    gpt2_def = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "gpt2")
    kw = {k.arg: k.value.value for n in ast.walk(gpt2_def) if isinstance(n, ast.Call)
          for k in n.keywords if isinstance(k.value, ast.Constant)}
    assert kw["vocab_bpe_hash"] == tokens.VOCAB_BPE_SHA256
    assert kw["encoder_json_hash"] == tokens.ENCODER_JSON_SHA256
    assert public.r50k_pat_str == tokens.GPT2_PATTERN


def test_gpt2_refuses_files_with_the_wrong_hash(monkeypatch, tmp_path):
    vocab, encoder = tokens._gpt2_files()
    bad = tmp_path / "vocab.bpe"
    bad.write_bytes(vocab.read_bytes() + b"x")
    monkeypatch.setattr(tokens, "_gpt2_files", lambda: (bad, encoder))
    tokens.gpt2.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"vocab.bpe has sha256 .* not GPT-2's"):
            tokens.gpt2()
    finally:
        tokens.gpt2.cache_clear()


def test_encode_documents_appends_eot_after_each_document():
    enc = tokens.gpt2()
    flat = tokens.encode_documents(["Hello world", " the"])
    assert flat.dtype == np.uint16
    assert flat.tolist() == [15496, 995, 50256, 262, 50256]
    assert enc.decode(flat.tolist()) == "Hello world<|endoftext|> the<|endoftext|>"


# --- corpus sources --------------------------------------------------------------------


def _docs(corpus: str, **kw) -> list[str]:
    return list(iter_documents(TokensConfig(corpus=corpus, **kw)))


def test_text_file_documents_are_blank_line_separated(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line\nsecond line\n\n\n  \nnext para\r\n\n\nlast 🙂", encoding="utf-8")
    assert _docs(str(f)) == ["first line\nsecond line", "next para", "last 🙂"]
    assert _docs(str(f), max_docs=2) == ["first line\nsecond line", "next para"]


def test_glob_reads_matches_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay\n\nay two")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "z.md").write_text("not matched")
    assert _docs(str(tmp_path / "*.txt")) == ["ay", "ay two", "bee"]
    assert _docs(str(tmp_path / "**" / "*.txt")) == ["ay", "ay two", "bee", "sea"]


def test_directory_reads_text_and_table_files_recursively(tmp_path):
    (tmp_path / "d" / "inner").mkdir(parents=True)
    (tmp_path / "d" / "b.md").write_text("markdown doc")
    (tmp_path / "d" / "a.txt").write_text("text one\n\ntext two")
    (tmp_path / "d" / ".hidden.txt").write_text("hidden")
    (tmp_path / "d" / "image.bin").write_bytes(b"\xff\xfe\x00binary")
    pq.write_table(pa.table({"text": ["row one", None, "row two"]}),
                   tmp_path / "d" / "inner" / "t.parquet")
    assert _docs(str(tmp_path / "d")) == ["text one", "text two", "markdown doc", "row one",
                                          "row two"]


def test_parquet_and_jsonl_read_the_text_column_through_datasets(tmp_path):
    pq.write_table(pa.table({"id": [1, 2, 3], "body": ["alpha doc", "", "gamma doc"]}),
                   tmp_path / "t.parquet")
    with open(tmp_path / "t.jsonl", "w") as f:
        for i, text in enumerate(["json one", "json 二"]):
            f.write(json.dumps({"id": i, "body": text}) + "\n")
    assert _docs(str(tmp_path / "t.parquet"), text_column="body") == ["alpha doc", "gamma doc"]
    assert _docs(str(tmp_path / "t.jsonl"), text_column="body") == ["json one", "json 二"]
    with pytest.raises(ValueError, match="no column 'text'"):
        iter_documents(TokensConfig(corpus=str(tmp_path / "t.parquet")))
    with pytest.raises(ValueError, match="no key 'text'"):
        iter_documents(TokensConfig(corpus=str(tmp_path / "t.jsonl")))


def test_hf_loader_streams_local_files(tmp_path):
    """load_hf is the hf: code path; on this offline machine `datasets` reads local files."""
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(2500)]}), tmp_path / "t.parquet")
    ds = load_hf("parquet", None, split="train", data_files=[str(tmp_path / "t.parquet")])
    texts = list(_rows_text(ds, "text", "local"))
    assert texts == [f"row {i}" for i in range(2500)]  # order kept across 1024-row batches
    with pytest.raises(ValueError, match="no column 'body'"):
        next(_rows_text(ds, "body", "local"))


def test_hf_falls_back_to_the_parquet_export(monkeypatch, tmp_path, caplog):
    import datasets

    pq.write_table(pa.table({"text": ["web page one", "web page two"]}), tmp_path / "t.parquet")
    real = datasets.load_dataset
    calls = []

    def fake(path, name=None, **kw):
        calls.append((path, name, kw))
        if "revision" not in kw:
            raise RuntimeError(f"{SCRIPT_ERROR}, but found openwebtext.py")
        return real("parquet", data_files=[str(tmp_path / "t.parquet")], split=kw["split"],
                    streaming=kw["streaming"])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with caplog.at_level("WARNING", logger="mono.corpus"):
        docs = _docs("hf:Skylion007/openwebtext:plain_text")
    assert docs == ["web page one", "web page two"]
    assert [c[2].get("revision") for c in calls] == [None, "refs/convert/parquet"]
    assert all(c[:2] == ("Skylion007/openwebtext", "plain_text") and c[2]["streaming"]
               for c in calls)
    assert "refs/convert/parquet" in caplog.text
    calls.clear()
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other failure")))
    with pytest.raises(RuntimeError, match="other failure"):
        _docs("hf:some/dataset")


@pytest.mark.parametrize("make, error, match", [
    (lambda p: str(p / "missing.txt"), MissingInput, "not found"),
    (lambda p: str(p / "*.nothing"), MissingInput, "matches no files"),
    (lambda p: (p / "empty_dir").mkdir() or str(p / "empty_dir"), MissingInput, "holds no"),
    (lambda p: (p / "bin.txt").write_bytes(b"ok \xff\xfe bad") and str(p / "bin.txt"),
     UserError, "not UTF-8"),
    (lambda p: (p / "x.parquet").write_bytes(b"not parquet") and str(p / "x.parquet"),
     UserError, "not a Parquet file"),
    (lambda p: "hf:", UserError, "hf:NAME"),
    (lambda p: (p / "x.txt.gz").write_bytes(b"not gzip" * 9) and str(p / "x.txt.gz"),
     UserError, r"x\.txt\.gz is not a valid gzip file: .*header"),
    (lambda p: (p / "x.jsonl.zst").write_bytes(b"not zstd" * 9) and str(p / "x.jsonl.zst"),
     UserError, r"x\.jsonl\.zst is not a valid zstd file"),
    (lambda p: (p / "x.parquet.gz").write_bytes(b"x") and str(p / "x.parquet.gz"),
     UserError, "compressed Parquet"),
])
def test_bad_sources_fail_when_opened(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        iter_documents(TokensConfig(corpus=make(tmp_path)))


def test_docstrings_are_read_from_source_without_importing(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text('"""Module doc."""\nimport nonexistent_module\n\n'
                   'class A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
                   'try:\n    pass\nexcept Exception:\n    def g():\n        """In handler."""\n'
                   'def h():\n    x = "not a docstring"\n')
    assert _docstrings(str(src)) == ["Module doc.", "Class doc.", "Method doc.",
                                     "In handler."]
    (tmp_path / "bad.py").write_text("def (:\n")
    assert _docstrings(str(tmp_path / "bad.py")) == []


@pytest.mark.slow
def test_embedded_corpus_is_deterministic_english():
    from pydoc_data import topics

    docs = tuple(embedded_documents())
    assert docs[:len(topics.topics)] == tuple(topics.topics[k] for k in sorted(topics.topics))
    assert len(docs) > 500 and sum(map(len, docs)) > 1_500_000
    assert any(d.startswith("JSON (JavaScript Object Notation)") for d in docs)  # json module
    assert _docs("", max_docs=3) == list(docs[:3])


# --- split -----------------------------------------------------------------------------


def test_split_is_seeded_and_guarantees_min_val_docs():
    tc = TokensConfig(val_fraction=0.0005, min_val_docs=2)
    docs = [str(i) for i in range(64)]
    flags = [v for v, _ in tokens.split_documents(docs, tc, seed=0)]
    assert sum(flags) == 2  # 64 docs x 0.0005 < 2: the guarantee decides
    assert flags == [v for v, _ in tokens.split_documents(iter(docs), tc, seed=0)]
    assert flags != [v for v, _ in tokens.split_documents(docs, tc, seed=1)]
    assert [t for _, t in tokens.split_documents(docs, tc, seed=0)] == docs  # order kept
    two = [v for v, _ in tokens.split_documents(["a", "b"], tc, seed=0)]
    assert sorted(two) == [False, True]  # never every document to val


def test_split_fraction_holds_past_the_lookahead():
    tc = TokensConfig(val_fraction=0.1, min_val_docs=2)  # lookahead of 20 documents
    n_val = sum(v for v, _ in tokens.split_documents(map(str, range(5000)), tc, seed=3))
    assert abs(n_val - 500) < 4 * (5000 * 0.1 * 0.9) ** 0.5


def test_tokenize_block_udf_without_ray():
    block = pa.table({"text": ["Hello world", " the", "Hello"], "val": [False, True, False]})
    out = tokens._tokenize_block(block)
    assert out.column("val").to_pylist() == [False, True]
    assert out.column("docs").to_pylist() == [2, 1]
    assert out.column("tokens").to_pylist() == [[15496, 995, 50256, 15496, 50256], [262, 50256]]


# --- the stage on Ray ------------------------------------------------------------------


def _split_docs(docs, cfg) -> dict[str, list[str]]:
    out = {"train": [], "val": []}
    for is_val, text in tokens.split_documents(docs, cfg.tokens, cfg.seed):
        out["val" if is_val else "train"].append(text)
    return out


def _files(out) -> dict[str, bytes]:
    root = Path(out) / "tokens"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_run_writes_shards_that_decode_to_the_corpus(ray_local, tmp_path, corpus, monkeypatch):
    path, docs = corpus
    cfg = _cfg(tmp_path / "out", path, docs_per_block=3)  # 22 blocks: 2 Ray Data windows
    windows, real_windows = [], tokens._windows
    monkeypatch.setattr(tokens, "_windows",
                        lambda blocks: (windows.append(len(w)) or w for w in real_windows(blocks)))
    manifest = tokens.run(cfg)
    assert len(windows) >= 2 and sum(windows) == 22  # order must hold across windows too
    T = cfg.tokens.ctx_len

    assert manifest == store.tokens_manifest(cfg.out)
    assert {"tokenizer", "corpus", "ctx_len", "seed", "val_fraction", "docs", "rows", "dir",
            "splits"} <= set(manifest)
    assert (manifest["tokenizer"], manifest["corpus"], manifest["ctx_len"]) == ("gpt2",
                                                                               str(path), T)
    assert (manifest["split"], manifest["split_reason"]) == ("document", None)
    expected = _split_docs(docs, cfg)
    assert manifest["docs"] == {s: len(d) for s, d in expected.items()}
    assert manifest["docs"]["val"] == 2  # tiny preset: min_val_docs
    enc = tokens.gpt2()
    for split, split_docs in expected.items():
        meta = manifest["splits"][split]
        ctx, toks = store.read_tokens(cfg.out, split)
        assert toks.shape == (manifest["rows"][split], T) and meta["rows"] > 0
        assert ctx.tolist() == list(range(meta["rows"]))  # dense global ids, file order
        stream = tokens.encode_documents(split_docs)
        assert len(stream) // T == meta["rows"] and meta["tokens_dropped"] == len(stream) % T
        np.testing.assert_array_equal(toks.reshape(-1), stream[:meta["rows"] * T])
        names = [f["name"] for f in meta["files"]]
        assert names == [f"part-{i:05d}.parquet" for i in range(len(names))]
        assert [os.path.basename(f) for f in store.token_files(cfg.out, split)] == names
        assert sum(f["rows"] for f in meta["files"]) == meta["rows"]
        for f in meta["files"]:
            table = pq.read_table(Path(cfg.out) / "tokens" / split / f["name"])
            assert table.schema == store.tokens_schema(T) and table.num_rows == f["rows"] <= 8
    train = store.read_tokens(cfg.out, "train")[1]
    text = enc.decode(train.reshape(-1).tolist())
    assert text.startswith(expected["train"][0] + "<|endoftext|>" + expected["train"][1])
    assert len(manifest["splits"]["train"]["files"]) > 1  # several shards, several blocks

    ids = [5, 0, manifest["rows"]["train"] - 1, 8, 5]
    np.testing.assert_array_equal(store.read_context(cfg.out, ids), train[ids])
    val = store.read_tokens(cfg.out, "val")[1]
    np.testing.assert_array_equal(store.read_context(cfg.out, [1, 0], "val"), val[[1, 0]])
    with pytest.raises(ValueError, match="out of range"):
        store.read_context(cfg.out, [manifest["rows"]["train"]])
    assert not (Path(cfg.out) / "tokens" / "_staging").exists()


def test_rerun_is_deterministic_and_never_duplicates(ray_local, tmp_path, corpus):
    path, docs = corpus
    out = tmp_path / "out"
    first = tokens.run(_cfg(out, path, rows_per_shard=4))  # more, smaller shards
    many = _files(out)
    second = tokens.run(_cfg(out, path))
    files = _files(out)
    assert second["rows"] == first["rows"]
    assert len(files) < len(many)  # the earlier run's extra part files are gone
    listed = {f"{s}/{f['name']}" for s in ("train", "val") for f in second["splits"][s]["files"]}
    assert set(files) == listed | {"manifest.json"}
    assert tokens.run(_cfg(out, path)) == second
    assert _files(out) == files  # byte-identical rerun
    seed1 = with_overrides(_cfg(tmp_path / "seed1", path), seed=1)
    assert tokens.run(seed1)["seed"] == 1
    assert _split_docs(docs, seed1)["val"] != _split_docs(docs, _cfg(out, path))["val"]
    val0, val1 = (store.read_tokens(str(o), "val")[1] for o in (out, tmp_path / "seed1"))
    assert val0.shape != val1.shape or not np.array_equal(val0, val1)


def test_bad_input_writes_nothing(ray_local, tmp_path, corpus):
    path, docs = corpus
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    small = _write_corpus(tmp_path / "small.txt", ["one short doc", "two", "three"])
    cases = [(blank, UserError, "has no documents"), (tmp_path / "nope.txt", MissingInput,
                                                       "not found"),
             (small, UserError, "too small")]
    for corpus_path, error, match in cases:
        out = tmp_path / f"out-{corpus_path.name}"
        with pytest.raises(error, match=match):
            tokens.run(_cfg(out, corpus_path))
        assert not out.exists()

    # A failed rerun leaves the previous good output as it was.
    good = tmp_path / "good"
    tokens.run(_cfg(good, path))
    before = _files(good)
    with pytest.raises(UserError, match="too small"):
        tokens.run(_cfg(good, small))
    assert _files(good) == before


def test_job_main_and_help(ray_local, tmp_path, corpus, capsys):
    from ray_jobs import tokenize_corpus

    path, _ = corpus
    manifest = tokenize_corpus.main(["--preset", "tiny", "--out", str(tmp_path / "job"),
                                     "--corpus", str(path), "--rows_per_shard", "16"])
    assert manifest["rows"]["train"] > 0 and manifest["rows"]["val"] > 0
    assert all(len(manifest["splits"][s]["files"]) == -(-manifest["rows"][s] // 16)
               for s in ("train", "val"))
    assert "train /" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        tokenize_corpus.main(["--help"])
    assert exit_info.value.code == 0
    assert "--corpus" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        tokenize_corpus.main(["--preset", "tiny", "--ctx_len", "0"])
    assert exit_info.value.code == 2


# --- corpora users bring: one long paragraph, compressed files, datasets on disk ---------


def _lines(n_lines: int, seed: int = 0) -> str:
    """One paragraph: n_lines lines of ~20 words, no blank line (notes, a log, a book)."""
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=20)) + "." for _ in range(n_lines))


def test_single_paragraph_file_splits_token_level(ray_local, tmp_path, caplog):
    text = _lines(120)
    path = tmp_path / "notes.txt"
    path.write_text(text + "\n", encoding="utf-8")
    cfg = _cfg(tmp_path / "out", path, val_fraction=0.1)
    with caplog.at_level("INFO", logger="mono.tokens"):
        manifest = tokens.run(cfg)
    T = cfg.tokens.ctx_len
    stream = tokens.encode_documents([text])
    n = len(stream) // T
    n_val = round(0.1 * n)
    assert n_val >= 2 and manifest["rows"] == {"train": n - n_val, "val": n_val}
    assert manifest["split"] == "token" and "min_val_docs=2" in manifest["split_reason"]
    assert store.tokens_manifest(cfg.out)["split"] == "token"
    assert f"split: token-level, the last {n_val} of {n} contexts" in caplog.text
    train, val = (store.read_tokens(cfg.out, s)[1] for s in ("train", "val"))
    # The last val_fraction of the stream, cut at a context boundary; only the tail is dropped.
    np.testing.assert_array_equal(np.concatenate([train, val]).reshape(-1), stream[:n * T])
    assert manifest["docs"] == {"train": 1, "val": 1}  # the cut goes through the one document
    assert manifest["splits"]["val"]["tokens_dropped"] == len(stream) % T
    assert tokens.run(cfg) == manifest  # deterministic

    # Many documents whose val share is too short for a context: the same rule, corpus order.
    docs = [_doc(i, 30 + i % 40) for i in range(64)]
    val = {i for i, (v, _) in enumerate(tokens.split_documents(docs, cfg.tokens, 0)) if v}
    docs = [f"v{i}" if i in val else d for i, d in enumerate(docs)]
    short = tokens.run(_cfg(tmp_path / "short", _write_corpus(tmp_path / "s.txt", docs)))
    assert short["split"] == "token" and "val 2 / 0" in short["split_reason"]
    stream = tokens.encode_documents(docs)
    got = np.concatenate([store.read_tokens(str(tmp_path / "short"), s)[1] for s in
                          ("train", "val")])
    np.testing.assert_array_equal(got.reshape(-1), stream[:got.size])
    assert short["rows"]["val"] == 1 and sum(short["docs"].values()) in (64, 65)


def test_too_small_corpus_names_both_numbers_and_writes_nothing(ray_local, tmp_path):
    T = preset("tiny").tokens.ctx_len  # 64: two contexts are 128 tokens
    assert len(tokens.encode_documents(["the" + " the" * 126])) == 2 * T
    fits = tmp_path / "fits.txt"
    fits.write_text("the" + " the" * 126)
    manifest = tokens.run(_cfg(tmp_path / "fits", fits))
    assert manifest["rows"] == {"train": 1, "val": 1} and manifest["split"] == "token"

    short = tmp_path / "short.txt"
    short.write_text("the" + " the" * 125)  # 127 tokens with the EOT
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"too small: it has 127 tokens \(1 documents.* needs "
                                        r"at least 128, one context of ctx_len=64"):
        tokens.run(_cfg(out, short))
    assert not out.exists()


def _compress(path: Path, codec: str) -> Path:
    suffix = {"gzip": ".gz", "zstd": ".zst"}[codec]
    target = path.with_name(path.name + suffix)
    with pa.output_stream(str(target), compression=codec) as f:
        f.write(path.read_bytes())
    return target


def _shards(out) -> dict[str, bytes]:
    return {k: v for k, v in _files(out).items() if k != "manifest.json"}


def test_gzip_and_zstd_give_the_shards_of_the_plain_files(ray_local, tmp_path, corpus):
    import gzip

    path, docs = corpus
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)),
                     encoding="utf-8")
    (tmp_path / "gz.txt.gz").write_bytes(gzip.compress(path.read_bytes()))  # gzip's own writer
    (tmp_path / "d").mkdir()
    for codec in ("gzip", "zstd"):
        _compress(jsonl, codec).rename(tmp_path / "d" / (jsonl.name + {"gzip": ".gz",
                                                                       "zstd": ".zst"}[codec]))
    # A directory reads .jsonl.gz and .jsonl.zst, each as the plain JSONL, in name order.
    assert _docs(str(tmp_path / "d")) == _docs(str(jsonl)) * 2 == docs * 2

    plain = tokens.run(_cfg(tmp_path / "plain", path))
    expected = _shards(tmp_path / "plain")
    sources = [tmp_path / "gz.txt.gz", _compress(path, "gzip"), _compress(path, "zstd"),
               tmp_path / "*.txt.zst", jsonl, _compress(jsonl, "gzip"), _compress(jsonl, "zstd")]
    for i, src in enumerate(sources):
        manifest = tokens.run(_cfg(tmp_path / f"out{i}", src))
        assert _shards(tmp_path / f"out{i}") == expected, src
        assert manifest["corpus_sha256"] == plain["corpus_sha256"], src


def test_corrupt_gzip_names_the_file_and_writes_nothing(ray_local, tmp_path, corpus,
                                                        monkeypatch):
    import gzip

    path, docs = corpus
    garbage = tmp_path / "garbage.txt.gz"
    garbage.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)  # a gzip magic, then junk
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"corpus file .*garbage\.txt\.gz is not a valid gzip "
                                        r"file: zlib inflate failed"):
        tokens.run(_cfg(out, garbage))
    assert not out.exists()

    # Truncated (an interrupted download): the first 64 KiB check passes, the stream fails
    # after train shards were staged; staging and the new directories are removed.
    packed = gzip.compress("\n\n".join(_doc(i, 60) for i in range(600)).encode())  # ~250 kB
    truncated = tmp_path / "truncated.txt.gz"
    truncated.write_bytes(packed[:len(packed) * 2 // 3])
    iter_documents(TokensConfig(corpus=str(truncated)))  # the eager check passes
    written, write = [], store.write_table_atomic
    monkeypatch.setattr(store, "write_table_atomic",
                        lambda p, t: written.append(p) or write(p, t))
    cfg = _cfg(out, truncated, val_fraction=0.5, rows_per_shard=1)  # a lookahead of 4 docs
    with pytest.raises(UserError, match=r"truncated\.txt\.gz is not a valid gzip file: "
                                        r"Truncated compressed stream"):
        tokens.run(cfg)
    assert written and not out.exists()

    good = tmp_path / "good"
    tokens.run(_cfg(good, path))
    before = _files(good)
    with pytest.raises(UserError, match="truncated"):
        tokens.run(_cfg(good, truncated, val_fraction=0.5, rows_per_shard=1))
    assert _files(good) == before  # a failed rerun leaves the previous output as it was


def _jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d if i != 3 else None}) + "\n")
    return path


def test_save_to_disk_dir_gives_the_shards_of_its_jsonl(ray_local, tmp_path, corpus):
    import datasets

    _, docs = corpus
    jsonl = _jsonl(tmp_path / "corpus.jsonl", docs)
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train",
                               cache_dir=str(tmp_path / "cache"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds.select(range(5)), "test": ds}).save_to_disk(
        str(tmp_path / "dict"))
    assert _docs(str(tmp_path / "saved")) == _docs(str(jsonl)) == docs[:3] + docs[4:]

    a = tokens.run(_cfg(tmp_path / "from_jsonl", jsonl))
    b = tokens.run(_cfg(tmp_path / "from_saved", tmp_path / "saved"))
    c = tokens.run(_cfg(tmp_path / "from_dict", tmp_path / "dict", hf_split="test"))
    assert _shards(tmp_path / "from_saved") == _shards(tmp_path / "from_jsonl")
    assert _shards(tmp_path / "from_dict") == _shards(tmp_path / "from_jsonl")
    assert a["corpus_sha256"] == b["corpus_sha256"] == c["corpus_sha256"]
    assert _docs(str(tmp_path / "dict")) == docs[:3] + docs[4:5]  # hf_split: train
    with pytest.raises(UserError, match=r"has no split 'validation' \(splits: \['test', "
                                        r"'train'\]\)"):
        _docs(str(tmp_path / "dict"), hf_split="validation")
    with pytest.raises(UserError, match="no column 'body'"):
        next(iter_documents(TokensConfig(corpus=str(tmp_path / "saved"),
                                                text_column="body")))


def test_local_hf_dataset_repo_reads_its_split_offline(tmp_path, monkeypatch):
    repo = tmp_path / "openwebtext"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nlicense: cc0-1.0\n---\n# Web pages\n\nNot a document.\n")
    pq.write_table(pa.table({"text": ["page 0", "page 1"]}),
                   repo / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": ["page 2"]}), repo / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": ["held out"]}), repo / "data" / "test-00000-of-00001.parquet")

    def no_network(*args, **kwargs):
        raise AssertionError("reading a local dataset touched the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert _docs(str(repo)) == ["page 0", "page 1", "page 2"]
    assert _docs(str(repo), hf_split="test") == ["held out"]
    assert _docs(f"hf:{repo}") == ["page 0", "page 1", "page 2"]
    (repo / "README.md").write_text("# Just notes\n")  # no dataset card: read file by file
    assert _docs(str(repo)) == ["# Just notes", "held out", "page 0", "page 1", "page 2"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_pipeline_runs_on_one_paragraph(ray_local, tmp_path, capsys):
    from ray_jobs import pipeline

    path = tmp_path / "notes.txt"
    path.write_text(_lines(700, seed=1) + "\n", encoding="utf-8")  # ~21 k tokens, no blank line
    out = tmp_path / "run"
    results = pipeline.main(["--preset", "tiny", "--out", str(out), "--corpus", str(path)])
    # splitting runs only when the sweep has >= 2 dictionary sizes (the tiny one has one)
    assert all(r["ran"] for r in results if r["stage"] != "splitting"), results
    manifest = store.tokens_manifest(str(out))
    assert manifest["split"] == "token" and manifest["rows"]["val"] == 1
    assert (out / "lm" / "model.safetensors").stat().st_size > 0
    assert list((out / "analysis").rglob("html/index.html"))
    assert "=== summary:" in capsys.readouterr().out
