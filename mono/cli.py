"""The command line every job shares: `--preset NAME --out DIR [--<field> VALUE ...]`.

Stdlib only. Flags are built from the config dataclasses; each field's attribute docstring in
`mono/config.py` is its help text. Every field is reachable as `--<section>.<field>`
(`--sae.lr 1e-3`); the bare `--<field>` works too and means the first section, in the job's
section order, that has a field of that name (so `sweep_sae --lr 1e-4 3e-4` sets the grid,
while `train_lm --lr 1e-3` sets the LM's). `--corpus` is `--tokens.corpus`.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import os
import typing
from collections.abc import Callable
from dataclasses import fields, replace

from mono import config as config_module
from mono.config import SECTIONS, Config, field_types, preset


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
          sections: tuple[str, ...], init: Callable[[], object] | None = None) -> Config:
    """Parse a job's command line into a validated Config (preset + overrides).

    Invalid values exit with a usage error that names the field and the value. `init`
    (a job's `ray.init`, from its `__main__`) runs only once the arguments parsed, so
    `--help` and bad flags never wait for Ray.
    """
    parser = build_parser(prog, description, sections)
    args = vars(parser.parse_args(argv))
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
        # starts or any stage writes (store.check_remote; local dirs are checked by stages).
        from mono import store

        store.check_remote(cfg.out)
        if cfg.sweep.storage_path:
            store.check_remote(cfg.sweep.storage_path, "--sweep.storage_path")
    except (ValueError, TypeError) as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
    if init is not None:
        init()
        from mono import cluster
        from mono.errors import UserError

        try:  # needs Ray: how many nodes there are or may be
            cluster.check_local_out(cfg.out)
        except UserError as err:
            parser.error(str(err))
    return cfg
