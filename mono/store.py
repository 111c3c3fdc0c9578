"""Artifacts: the one module that knows paths, file names, manifests and Parquet schemas.

Every stage reads and writes under a run directory `out` (a local path or an s3://, gs://
URI; pyarrow.fs picks the filesystem):

    <out>/cfg.json                           the Config of the last stage run
    <out>/tokens/{train,val}/part-*.parquet  token shards (schema below)
    <out>/tokens/manifest.json               written last: tokenizer, corpus, T, rows, files
    <out>/lm/cfg.json, model.safetensors     the LM (+ train state for resume)
    <out>/acts/part-*.parquet                activation shards (schema below)
    <out>/acts/manifest.json                 written last
    <out>/sweep/<experiment>/...             Tune experiment
    <out>/analysis/<trial>/                  feature tables + html/

Manifests and shards are written to a temporary name and renamed, so a reader never sees
half a file and a crashed stage leaves no manifest (which marks it unfinished).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# --- filesystems -----------------------------------------------------------------------


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(*parts: str) -> str:
    first, *rest = (str(p) for p in parts)
    return "/".join([first.rstrip("/"), *(p.strip("/") for p in rest)])


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def list_files(dir_path: str, suffix: str = ".parquet") -> list[str]:
    """Sorted files directly under dir_path ending in suffix ([] if the dir is missing)."""
    fs, p = resolve(dir_path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    names = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(dir_path, n) for n in names]


def delete(path: str) -> None:
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        fs.delete_file(p)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(p)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename over `path` (atomic on local/POSIX)."""
    fs, p = resolve(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None


def write_json(path: str, obj) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=False).encode())


def read_json(path: str):
    return json.loads(read_bytes(path))


def write_table_atomic(path: str, table: pa.Table, compression: str = "zstd") -> None:
    """Write one Parquet file under a temporary name and rename it into place."""
    fs, p = resolve(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp, filesystem=fs, compression=compression)
    fs.move(tmp, p)


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, p = resolve(path)
    try:
        return pq.read_table(p, filesystem=fs, columns=columns)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such Parquet file: {path}") from None


# --- run layout ------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Paths of every artifact of one run directory."""

    out: str

    @property
    def cfg(self) -> str:
        return join(self.out, "cfg.json")

    def tokens(self, split: str) -> str:
        assert split in ("train", "val"), split
        return join(self.out, "tokens", split)

    @property
    def tokens_manifest(self) -> str:
        return join(self.out, "tokens", "manifest.json")

    @property
    def lm(self) -> str:
        return join(self.out, "lm")

    @property
    def acts(self) -> str:
        return join(self.out, "acts")

    @property
    def acts_manifest(self) -> str:
        return join(self.out, "acts", "manifest.json")

    @property
    def sweep(self) -> str:
        return join(self.out, "sweep")

    def analysis(self, trial: str) -> str:
        return join(self.out, "analysis", trial)


# --- token shards ----------------------------------------------------------------------
# One row per context window of T tokens:
#   ctx: int64                  global context id, dense per split: 0..rows-1 in file order
#   tokens: fixed_size_list<uint16>[T]  GPT-2 ids (< 65536)
# File names: part-{index:05d}.parquet, index = position of the file in the split.
# Paper preset: 9.0 B OpenWebText tokens -> 8.8 M train contexts, ~18 GB.


def tokens_schema(ctx_len: int) -> pa.Schema:
    return pa.schema([("ctx", pa.int64()), ("tokens", pa.list_(pa.uint16(), ctx_len))])


def token_table(ctx, tokens) -> pa.Table:
    """ctx (N,) int64, tokens (N, T) integer array -> a table with the token-shard schema."""
    import numpy as np

    tokens = np.ascontiguousarray(tokens, dtype=np.uint16)
    n, t = tokens.shape
    flat = pa.array(tokens.reshape(-1), type=pa.uint16())
    col = pa.FixedSizeListArray.from_arrays(flat, t)
    return pa.Table.from_arrays([pa.array(np.asarray(ctx, dtype=np.int64)), col],
                                schema=tokens_schema(t))


def table_tokens(table: pa.Table):
    """The inverse of token_table: (ctx (N,) int64, tokens (N, T) int64)."""
    import numpy as np

    col = table.column("tokens").combine_chunks()
    t = col.type.list_size
    tokens = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, t).astype(np.int64)
    return table.column("ctx").to_numpy().astype(np.int64), tokens


def token_files(out: str, split: str) -> list[str]:
    files = list_files(Layout(out).tokens(split))
    if not files:
        raise FileNotFoundError(
            f"no token shards in {Layout(out).tokens(split)}: run "
            f"`python -m ray_jobs.tokenize_corpus --out {out}` first"
        )
    return files


def tokens_manifest(out: str) -> dict:
    path = Layout(out).tokens_manifest
    if not exists(path):
        raise FileNotFoundError(
            f"no token manifest at {path}: tokenization did not finish; run "
            f"`python -m ray_jobs.tokenize_corpus --out {out}`"
        )
    return read_json(path)


def read_tokens(out: str, split: str):
    """All contexts of a split: (ctx (N,) int64, tokens (N, T) int64). For small runs/eval."""
    import numpy as np

    parts = [table_tokens(read_table(f)) for f in token_files(out, split)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_context(out: str, ctx_ids, split: str = "train"):
    """Token windows (len(ctx_ids), T) int64 for global context ids, in the order given.

    Uses the manifest's per-file ctx ranges, so only the files holding the ids are read.
    """
    import numpy as np

    ctx_ids = np.asarray(ctx_ids, dtype=np.int64)
    files = tokens_manifest(out)["splits"][split]["files"]  # [{"name", "first", "rows"}]
    firsts = np.array([f["first"] for f in files], dtype=np.int64)
    total = files[-1]["first"] + files[-1]["rows"] if files else 0
    if ctx_ids.size and (ctx_ids.min() < 0 or ctx_ids.max() >= total):
        raise ValueError(f"ctx ids out of range [0, {total}) for split {split!r}")
    which = np.searchsorted(firsts, ctx_ids, side="right") - 1
    result = None
    for fi in np.unique(which):
        meta = files[fi]
        _, toks = table_tokens(read_table(join(Layout(out).tokens(split), meta["name"])))
        if result is None:
            result = np.empty((len(ctx_ids), toks.shape[1]), dtype=np.int64)
        sel = which == fi
        result[sel] = toks[ctx_ids[sel] - meta["first"]]
    if result is None:
        result = np.empty((0, tokens_manifest(out)["ctx_len"]), dtype=np.int64)
    return result
