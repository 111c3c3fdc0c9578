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
    <out>/splitting/                         features matched across sizes, families, a map

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

from mono.errors import MissingInput, UserError

# --- filesystems -----------------------------------------------------------------------


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def check_remote(uri: str, what: str = "--out") -> None:
    """Raise BadOutput naming `uri` unless this process can write under it: the scheme has a
    filesystem, the bucket exists and answers with these credentials, and a probe object
    can be written and deleted under the prefix. Local paths are left to the caller.

    Cheap (three requests) and side-effect free, so every job runs it on its driver before
    ray.init: a typo'd bucket or a missing instance profile fails in a second, not after a
    GPU node booted, and leaves nothing behind. It checks the driver's credentials; workers
    get theirs from the node (cluster.yaml's instance profile) or the job's runtime_env.
    """
    from mono.errors import BadOutput

    if not is_uri(uri):
        return
    hint = ("check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an "
            "instance profile; GOOGLE_APPLICATION_CREDENTIALS for gs://) and, for an "
            "S3-compatible server, AWS_ENDPOINT_URL")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
        raise BadOutput(f"{what} {uri}: not a usable storage URI ({err}); use s3://BUCKET/"
                        f"PREFIX or gs://BUCKET/PREFIX") from None
    bucket, _, prefix = path.partition("/")
    if not bucket:
        raise BadOutput(f"{what} {uri}: no bucket in the URI; use s3://BUCKET/PREFIX")
    scheme = uri.split("://", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise BadOutput(f"{what} {uri}: cannot reach bucket {scheme}://{bucket} ({err}); "
                        f"{hint}") from None
    if info.type == pafs.FileType.NotFound:
        raise BadOutput(f"{what} {uri}: bucket {scheme}://{bucket} does not exist (create it "
                        f"first, e.g. `aws s3 mb {scheme}://{bucket}`)")
    if prefix and fs.get_file_info(path).type == pafs.FileType.File:
        raise BadOutput(f"{what} {uri} is an object, not a prefix: pick another --out")
    # pyarrow keeps the parent of a deleted object existing: a check that passes leaves
    # the empty marker `<prefix>/`, as the run's first write would; a refused one, nothing.
    path = path.rstrip("/")
    probe = f"{path}/.mono-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as err:
        raise BadOutput(f"{what} {uri}: cannot write under this prefix ({err}); {hint}") \
            from None


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
    def acts_mean(self) -> str:
        """The training rows' mean activation (train_sae's mean-ablation baseline), cached."""
        return join(self.out, "acts", "mean.json")

    @property
    def token_counts(self) -> str:
        """Occurrences of every token id in the train split (features' logit effects), cached."""
        return join(self.out, "analysis", "token_counts.json")

    @property
    def sweep(self) -> str:
        return join(self.out, "sweep")

    def analysis(self, trial: str) -> str:
        return join(self.out, "analysis", trial)

    @property
    def splitting(self) -> str:
        return join(self.out, "splitting")


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
        raise MissingInput(
            f"no token shards in {Layout(out).tokens(split)}: run "
            f"`python -m ray_jobs.tokenize_corpus --out {out}` first"
        )
    return files


def read_manifest(path: str, what: str, stage: str, job: str, out: str) -> dict:
    """A stage's manifest.json (written last: its absence means the stage did not finish);
    a missing one raises MissingInput naming the job that writes it."""
    if not exists(path):
        raise MissingInput(f"no {what} manifest at {path}: {stage} did not finish; run "
                           f"`python -m ray_jobs.{job} --out {out}`")
    return read_json(path)


def tokens_manifest(out: str) -> dict:
    """<out>/tokens/manifest.json (written last by tokenization)."""
    return read_manifest(Layout(out).tokens_manifest, "token", "tokenization",
                         "tokenize_corpus", out)


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


def tokens_staging(out: str) -> str:
    """Where tokenize stages its shards before publish_tokens moves them into place."""
    return join(out, "tokens", "_staging")


def publish_tokens(out: str, staging: str, files: dict[str, list[dict]]) -> None:
    """Move staged shards `<staging>/<split>/<name>` into `<out>/tokens/<split>/`.

    Deletes the old manifest first (a crash below leaves the stage visibly unfinished), then
    overwrites shards by name and deletes `part-*` files an earlier, bigger run left, so a
    rerun never duplicates rows. The caller writes the new manifest afterwards.
    """
    delete(Layout(out).tokens_manifest)
    for split, metas in files.items():
        fs, final = resolve(Layout(out).tokens(split))
        fs.create_dir(final, recursive=True)
        keep = {m["name"] for m in metas}
        for name in sorted(keep):
            _, src = resolve(join(staging, split, name))
            fs.move(src, f"{final}/{name}")
        for info in fs.get_file_info(pafs.FileSelector(final, recursive=False)):
            if info.base_name.startswith("part-") and info.base_name not in keep:
                fs.delete_file(info.path)
    delete(staging)


def remove_empty_dir(path: str) -> None:
    """Delete a directory if it exists and is empty (cleanup after a failed stage)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory and not fs.get_file_info(
            pafs.FileSelector(p, recursive=False)):
        fs.delete_dir(p)


# --- activation shards (stage 3) -------------------------------------------------------
# One row per sampled token position:
#   ctx: int64    global id of the context window (dense per split, as in the token shards)
#   pos: int16    position in that context, 0..T-1
#   token: int32  the token id at pos
#   acts: arrow.fixed_shape_tensor[H]  the last MLP's activation after the GELU, before
#         c_proj, stored as float16 (default) or float32; bfloat16 has no Arrow/numpy type
#         and is stored as its uint16 bit pattern with field metadata {"mono.dtype":
#         "bfloat16"}: float32 = (bits.astype(uint32) << 16).view(float32) (`acts_array`).
# Arrow's canonical fixed-shape tensor: plain pyarrow reads it (`.to_numpy_ndarray()`, or the
# storage's flat values), and so does ray.data.read_parquet, as an (n, H) ndarray column.
# Rows are shuffled within a shard. Schema metadata (ACTS_META_KEYS, all strings) ties each
# shard to its LM checkpoint and sampling, so a rerun can tell finished shards from foreign
# ones without the manifest. File names: part-{first ctx:09d}.parquet, one per fixed range
# of `shard_contexts` contexts. compression="zstd": zstd level 1 over byte-stream-split
# floats (the exponent bytes compress). Paper preset: 2 M contexts x 200 = 400 M rows in
# 1954 shards of 204,800 rows, ~0.85 KB/row at H=512 fp16 with zstd (~180 MB per shard).

ACTS_STORAGE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
"""Stored dtype -> the numpy/Arrow type of the tensor column's values."""
ACTS_META_KEYS = ("lm_sha256", "tokens_sha256", "seed", "split", "tokens_per_context",
                  "ctx_len", "shard_contexts", "dtype", "d_mlp", "first_ctx", "n_contexts")
"""Shard schema metadata, as b"mono.<key>": str(value)."""


def acts_schema(d_mlp: int, dtype: str, meta: dict | None = None) -> pa.Schema:
    """The activation-shard schema; meta -> schema metadata `mono.<key>`."""
    if dtype not in ACTS_STORAGE:
        raise ValueError(f"activation dtype must be one of {sorted(ACTS_STORAGE)}, got {dtype!r}")
    tensor = pa.fixed_shape_tensor(pa.from_numpy_dtype(ACTS_STORAGE[dtype]), (d_mlp,))
    return pa.schema(
        [pa.field("ctx", pa.int64(), nullable=False),
         pa.field("pos", pa.int16(), nullable=False),
         pa.field("token", pa.int32(), nullable=False),
         pa.field("acts", tensor, nullable=False, metadata={"mono.dtype": dtype})],
        metadata={f"mono.{k}": str(v) for k, v in (meta or {}).items()},
    )


def acts_shard_name(first_ctx: int) -> str:
    return f"part-{first_ctx:09d}.parquet"


def acts_table(ctx, pos, token, acts, dtype: str, meta: dict | None = None) -> pa.Table:
    """Columns (N,) and acts (N, H) in the storage dtype (uint16 bits for bfloat16) -> a
    table with the activation-shard schema."""
    import numpy as np

    acts = np.ascontiguousarray(acts)
    n, h = acts.shape
    if acts.dtype != np.dtype(ACTS_STORAGE[dtype]):
        raise ValueError(f"acts for dtype {dtype!r} must be {ACTS_STORAGE[dtype]}, "
                         f"got {acts.dtype}")
    schema = acts_schema(h, dtype, meta)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), h)
    tensor = pa.ExtensionArray.from_storage(schema.field("acts").type, storage)
    cols = [pa.array(np.asarray(ctx, np.int64)), pa.array(np.asarray(pos, np.int16)),
            pa.array(np.asarray(token, np.int32)), tensor]
    return pa.Table.from_arrays(cols, schema=schema)


def acts_dtype(schema: pa.Schema) -> str:
    """The stored activation dtype of a shard schema (float16, float32 or bfloat16)."""
    meta = schema.field("acts").metadata or {}
    return meta.get(b"mono.dtype", b"").decode() or str(schema.field("acts").type.value_type)


def acts_array(column, dtype: str | None = None, float32: bool = False):
    """An `acts` column (Array or ChunkedArray, canonical tensor or fixed-size list) ->
    (N, H) numpy: float16/float32 as stored, bfloat16 decoded to float32; float32=True
    converts everything to float32."""
    import numpy as np

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    h = column.type.list_size
    x = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), h)  # (N, H)
    if dtype == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32) if float32 and x.dtype != np.float32 else x


def table_acts(table: pa.Table, float32: bool = False):
    """The inverse of acts_table: (ctx (N,), pos (N,), token (N,), acts (N, H))."""
    acts = acts_array(table.column("acts"), acts_dtype(table.schema), float32)
    return (table.column("ctx").to_numpy(), table.column("pos").to_numpy(),
            table.column("token").to_numpy(), acts)


def write_acts_shard(path: str, table: pa.Table, compression: str, row_group_rows: int) -> int:
    """Write one activation shard under a temporary name and rename it into place (a crash
    never leaves half a file under the final name); returns its size in bytes."""
    match compression:
        case "zstd":
            opts = dict(compression="zstd", compression_level=1,
                        use_byte_stream_split=["acts.list.element"])
        case "none":
            opts = dict(compression="none")
        case other:
            raise ValueError(f"compression must be 'zstd' or 'none', got {other!r}")
    fs, p = resolve(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    # Dictionaries and statistics pay off only for the small columns; on the activations
    # they cost most of the write time and save nothing.
    pq.write_table(table, tmp, filesystem=fs, row_group_size=row_group_rows,
                   use_dictionary=["ctx", "pos", "token"],
                   write_statistics=["ctx", "pos", "token"], **opts)
    size = fs.get_file_info(tmp).size
    fs.move(tmp, p)
    return size


def acts_shard_info(path: str) -> dict:
    """A shard's footer only: {"rows", "row_groups", "bytes", "meta": {key: str}}."""
    fs, p = resolve(path)
    with fs.open_input_file(p) as f:
        md = pq.ParquetFile(f).metadata
        size = f.size()
    schema_meta = md.schema.to_arrow_schema().metadata or {}
    meta = {k.decode()[5:]: v.decode() for k, v in schema_meta.items()
            if k.startswith(b"mono.")}
    return {"rows": md.num_rows, "row_groups": [md.row_group(i).num_rows
                                                for i in range(md.num_row_groups)],
            "bytes": size, "meta": meta}


def acts_manifest(out: str) -> dict:
    """<out>/acts/manifest.json (written last by collection)."""
    return read_manifest(Layout(out).acts_manifest, "activation", "collection",
                         "collect_acts", out)


def acts_files(out: str) -> list[str]:
    """The shards the manifest lists, in ctx order (other part-* files are ignored)."""
    return [join(Layout(out).acts, f["name"]) for f in acts_manifest(out)["files"]]


# --- LM checkpoints (stage 2) ----------------------------------------------------------
# <out>/lm/ (and every Ray Train checkpoint of the LM run) holds:
#   cfg.json           the whole Config of the training run; its "lm" section builds the
#                      model (a bare LmConfig dict is accepted too)
#   model.safetensors  float32 weights; the tied lm_head.weight is stored once, under
#                      transformer.wte.weight (safetensors refuses shared tensors);
#                      metadata {"step": str}
#   train_state.pt     {"model", "optimizer", "step", "torch_rng", "history"}: all a resume
#                      needs, in one atomic file so weights and optimizer state never
#                      disagree; read with torch.load(weights_only=True)
#   metrics.json       unigram baselines, val-loss history, last val loss, tokens seen
#   ray/               Ray Train's run storage (checkpoints it restores on a rerun)
# Written in that order, cfg.json last. Paper preset: 6.8 M parameters -> 27 MB of
# weights and an 82 MB train state.

LM_CFG, LM_WEIGHTS, LM_STATE, LM_METRICS = (
    "cfg.json", "model.safetensors", "train_state.pt", "metrics.json")


def lm_ray_storage(out: str) -> str:
    """Ray Train's storage_path for the LM run: <out>/lm/ray (absolute, as Ray wants)."""
    path = join(Layout(out).lm, "ray")
    return path if is_uri(path) else os.path.abspath(path)


def save_lm(lm_dir: str, model, cfg, train_state: dict | None = None,
            metrics: dict | None = None) -> None:
    """Write an LM checkpoint (the files above) into lm_dir; `cfg` is the run's Config.

    model: an `mono.lm.Lm` (unwrapped from DDP), train_state: the resume dict or None.
    """
    import io

    import safetensors.torch
    import torch

    step = str(train_state["step"]) if train_state else ""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}  # tied to transformer.wte.weight
    write_bytes_atomic(join(lm_dir, LM_WEIGHTS),
                       safetensors.torch.save(weights, metadata={"step": step}))
    if train_state is not None:
        buf = io.BytesIO()
        torch.save(train_state, buf)
        write_bytes_atomic(join(lm_dir, LM_STATE), buf.getvalue())
    if metrics is not None:
        write_json(join(lm_dir, LM_METRICS), metrics)
    write_json(join(lm_dir, LM_CFG), cfg.to_dict())


def lm_config(lm_dir: str):
    """The LmConfig in lm_dir/cfg.json (a whole Config's "lm" section, or a bare LmConfig)."""
    from mono.config import LmConfig, from_dict

    path = join(lm_dir, LM_CFG)
    if not exists(path):
        raise MissingInput(f"no LM checkpoint in {lm_dir} (missing {LM_CFG}): run "
                           f"`python -m ray_jobs.train_lm` first")
    raw = read_json(path)
    return from_dict(LmConfig, raw["lm"] if "lm" in raw else raw)


def check_lm_config(lm_dir: str, found, expect) -> None:
    """Raise UserError naming the fields where checkpoint config `found` differs from
    `expect` (both LmConfig); nothing when expect is None or they agree."""
    from dataclasses import asdict

    if expect is None or found == expect:
        return
    a, b = asdict(found), asdict(expect)
    diff = ", ".join(f"{k}={a[k]!r} (asked {b[k]!r})" for k in a if a[k] != b[k])
    raise UserError(f"the LM checkpoint in {lm_dir} does not match the requested LmConfig: "
                    f"{diff}")


def load_lm_dir(lm_dir: str, expect=None, device: str = "cpu"):
    """The Lm saved in lm_dir, in eval mode on device; `expect` (an LmConfig) must match."""
    import safetensors
    import safetensors.torch

    from mono.lm import Lm

    found = lm_config(lm_dir)
    check_lm_config(lm_dir, found, expect)
    path = join(lm_dir, LM_WEIGHTS)
    model = Lm(found)
    try:
        state = safetensors.torch.load(read_bytes(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (safetensors.SafetensorError, RuntimeError) as err:
        raise UserError(f"unreadable LM weights {path}: {err}") from err
    if unexpected or set(missing) - {"lm_head.weight", "transformer.wte.weight"} or len(
            missing) > 1:
        raise UserError(f"LM weights {path} do not match {LM_CFG}: missing {sorted(missing)}, "
                        f"unexpected {sorted(unexpected)}")
    return model.to(device).eval()


def load_lm(out: str, expect=None, device: str = "cpu"):
    """The trained LM of run `out` (<out>/lm/), in eval mode; `expect` (an LmConfig, e.g.
    cfg.lm) must match the checkpoint's or ValueError names the differing fields."""
    return load_lm_dir(Layout(out).lm, expect, device)


def load_train_state(lm_dir: str) -> dict | None:
    """lm_dir/train_state.pt (torch.load with weights_only=True), or None if absent."""
    import io
    import pickle

    import torch

    path = join(lm_dir, LM_STATE)
    if not exists(path):
        return None
    try:
        return torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise UserError(f"unreadable LM train state {path}: {err}") from err


def read_lm_metrics(out: str) -> dict:
    """<out>/lm/metrics.json: unigram baselines, val-loss history, final val loss."""
    return read_json(join(Layout(out).lm, LM_METRICS))
