"""The command line every job shares: `--preset NAME --out DIR [--<field> VALUE ...]`.

Stdlib only. Flags are built from the config dataclasses; each field's attribute docstring in
`mono/config.py` is its help text. Every field is reachable as `--<section>.<field>`
(`--sae.lr 1e-3`); the bare `--<field>` works too and means the first section, in the job's
section order, that has a field of that name (so `sweep_sae --lr 1e-4 3e-4` sets the grid,
while `train_lm --lr 1e-3` sets the LM's). `--corpus` is `--tokens.corpus`.

Errors: every job runs the same sequence, `main` around `parse`: parse the flags, check
`--out` (a local path must be a directory this user can write, or creatable), run the
stage's `check(cfg)` (its inputs, without Ray), then `init` (`ray.init`), then the stage.
A `mono.errors.UserError` raised anywhere in that sequence (also from a Ray task) is
printed as one line, `prog: error: message`, with exit status 2, like argparse's usage
errors; `--traceback` or MONO_TRACEBACK=1 prints its stack too. Any other exception is a
bug of mono and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import logging
import os
import sys
import traceback
import typing
from collections.abc import Callable
from dataclasses import fields, replace

from mono import config as config_module
from mono.config import SECTIONS, Config, field_types, preset
from mono.errors import BadOutput, UserError

TRACEBACK_ENV = "MONO_TRACEBACK"


@functools.cache
def field_docs() -> dict[tuple[str, str], str]:
    """(class name, field name) -> attribute docstring, read from config.py's source."""
    tree = ast.parse(inspect.getsource(config_module))
    docs = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[(cls.name, node.target.id)] = " ".join(nxt.value.value.split())
    return docs


def _parse_bool(text: str) -> bool:
    match text.lower():
        case "1" | "true" | "yes" | "on":
            return True
        case "0" | "false" | "no" | "off":
            return False
        case other:
            raise argparse.ArgumentTypeError(f"expected true/false, got {other!r}")


def _add_field(group, flags: list[str], dest: str, hint, default, doc: str) -> None:
    help_text = f"{doc} (default: {default!r})".replace("%", "%%")
    if hint is bool:
        group.add_argument(*flags, dest=dest, type=_parse_bool, nargs="?", const=True,
                           default=argparse.SUPPRESS, help=help_text, metavar="BOOL")
    elif typing.get_origin(hint) is tuple:
        (item, *_rest) = typing.get_args(hint)
        group.add_argument(*flags, dest=dest, type=item, nargs="*", default=argparse.SUPPRESS,
                           help=help_text, metavar=item.__name__.upper())
    else:
        group.add_argument(*flags, dest=dest, type=hint, default=argparse.SUPPRESS,
                           help=help_text, metavar=hint.__name__.upper())


def build_parser(prog: str, description: str, sections: tuple[str, ...]) -> argparse.ArgumentParser:
    """A parser with --preset, --out, --seed and the fields of `sections`, in that priority."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs()
    parser.add_argument("--preset", default="demo",
                        help="tiny (tests, seconds), demo (offline default, minutes) or paper "
                             "(the seed's numbers, clusters)")
    parser.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                        help=f"on a user error (a missing input, a bad --out), print the "
                             f"stack too, not just the one-line message (or "
                             f"{TRACEBACK_ENV}=1)")
    for f in fields(Config):
        if f.name in SECTIONS:
            continue
        _add_field(parser, [f"--{f.name}"], f.name, field_types(Config)[f.name], f.default,
                   docs.get(("Config", f.name), ""))
    taken = {"preset", "out", "seed"}
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(section, cls.__doc__)
        hints = field_types(cls)
        for f in fields(cls):
            flags = [f"--{section}.{f.name}"]
            if f.name not in taken:
                flags.insert(0, f"--{f.name}")
                taken.add(f.name)
            if section == "tokens" and f.name == "corpus":
                taken.add("corpus")
            default = f.default if f.default is not f.default_factory else None
            _add_field(group, flags, f"{section}.{f.name}", hints[f.name], default,
                       docs.get((cls.__name__, f.name), ""))
    return parser


def parse(argv: list[str] | None, prog: str, description: str,
          sections: tuple[str, ...], init: Callable[[], object] | None = None,
          check: Callable[[Config], object] | None = None) -> Config:
    """Parse a job's command line into a validated Config (preset + overrides).

    Invalid values exit with a usage error that names the field and the value. Then, still
    before Ray: a local `--out` is checked (`check_out`) and `check(cfg)`, the stage's input
    check, runs; both raise `UserError`. `init` (a job's `ray.init`, from its `__main__`)
    runs last, so `--help`, bad flags and bad inputs never wait for Ray.
    """
    parser = build_parser(prog, description, sections)
    args = vars(parser.parse_args(argv))
    args.pop("traceback", None)  # read by `main`, which catches the errors
    try:
        cfg = preset(args.pop("preset"))
        top = {k: v for k, v in args.items() if "." not in k}
        per_section: dict[str, dict] = {}
        for key, value in args.items():
            if "." in key:
                section, name = key.split(".", 1)
                if isinstance(value, list):
                    value = tuple(value)
                per_section.setdefault(section, {})[name] = value
        subs = {s: replace(getattr(cfg, s), **kv) for s, kv in per_section.items()}
        cfg = replace(cfg, **top, **subs)
        # Ray workers (Train, Tune, Data) run in other working directories: a relative
        # --out would point somewhere else there, so local paths become absolute here.
        if "://" not in cfg.out:
            cfg = replace(cfg, out=os.path.abspath(cfg.out))
        if cfg.sweep.storage_path and "://" not in cfg.sweep.storage_path:
            cfg = replace(cfg, sweep=replace(cfg.sweep,
                                             storage_path=os.path.abspath(cfg.sweep.storage_path)))
        # A URI --out (or Tune storage) this process cannot write fails here, before Ray
        # starts or any stage writes (store.check_remote; a local --out: check_out below).
        from mono import store

        store.check_remote(cfg.out)
        if cfg.sweep.storage_path:
            store.check_remote(cfg.sweep.storage_path, "--sweep.storage_path")
    except (ValueError, TypeError) as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
    check_out(cfg.out)
    if check is not None:
        check(cfg)
    if init is not None:
        init()
        from mono import cluster

        # Needs Ray (how many nodes there are or may be); its BadOutput is a UserError, one
        # line like every other (main).
        cluster.check_local_out(cfg.out)
    return cfg


def check_out(out: str) -> None:
    """Raise BadOutput unless the local directory `out` can be written by this process:
    it is a directory it may write, or the nearest existing ancestor is (the stages create
    the rest). URIs (s3://, gs://) are `store.check_remote`'s, which `parse` runs first.
    `os.access` asks the kernel with this process's ids: it answers for modes, ACLs,
    read-only mounts and immutable files alike, and changes nothing."""
    if "://" in out:
        return
    path = os.path.abspath(out)
    while not os.path.lexists(path):  # the stages create the missing part (mkdir -p)
        path = os.path.dirname(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise BadOutput(f"--out {out}: {path} is a broken symbolic link")
    if not os.path.isdir(path):
        where = "" if path == os.path.abspath(out) else f": {path}"
        raise BadOutput(f"--out {out}{where} is a file, not a directory")
    if not os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise BadOutput(f"--out {out}: directory {path} is not writable by this user")


def wants_traceback(argv: list[str]) -> bool:
    """--traceback on the command line or MONO_TRACEBACK set (to anything but '' or 0)."""
    return "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def user_error(err: UserError) -> UserError:
    """The UserError to report for `err`: itself, or, raised in a Ray task or actor, the
    original (Ray's RayTaskError is then also a UserError, its message the remote stack)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, UserError) else err


def main(job: Callable[..., object], prog: str, init: Callable[[], object] | None = None,
         argv: list[str] | None = None) -> None:
    """The `__main__` of every job: `job(argv, init=init)` (which parses with `parse`), with
    logging to stderr; a UserError becomes one line `prog: error: message` on stderr and exit
    status 2 (module doc). Other exceptions propagate with their traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        job(argv, init=init)
    except UserError as err:
        if wants_traceback(argv):
            traceback.print_exc()
        message = " ".join(str(user_error(err)).splitlines())  # one line, always
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.exit(2)
