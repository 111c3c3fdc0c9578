"""Stage 1, its sources: a `--corpus` spec -> a stream of text documents (no writes).

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

Yields the corpus's documents (str), in a deterministic order, blank ones skipped, streamed
so a corpus may exceed RAM; each `iter_documents` call reads it afresh from its start.
`mono.tokens` tokenizes them (and reads them twice for its token-level split).

Failure: a bad source (missing path, empty glob or directory, unreadable, corrupt or non-UTF-8
file, a table without the text column) raises `UserError`/`MissingInput` naming it when
`iter_documents` is called, before the caller does any work; a compressed file found corrupt
past its first 64 KiB raises the same when the stream reaches the damage. Limits: one process
reads the corpus; local paths and hf: only (no s3:// corpora); a text paragraph or table row
must fit in memory; compressed Parquet is refused (Parquet compresses its pages); the embedded
corpus depends on the Python version (`describe_corpus` names it).
"""

from __future__ import annotations

import ast
import codecs
import glob
import io
import itertools
import json
import logging
import os
import platform
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mono.config import TokensConfig
from mono.errors import MissingInput, UserError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
TABLE_SUFFIXES = {".parquet": "parquet", ".jsonl": "json"}  # suffix -> `datasets` builder
# Streamed through pyarrow's CompressedInputStream (zlib and zstd ship in every pyarrow wheel;
# `datasets` would need the `zstandard` package for .zst). Parquet compresses internally.
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
SCRIPT_ERROR = "Dataset scripts are no longer supported"  # datasets >= 4 (ENVIRONMENT.md)
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_READ_BUFFER = 1 << 20  # bytes read from a compressed file at a time


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
