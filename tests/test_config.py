"""Config and CLI: presets, validation at the boundary, cfg.json round trips, `--help`.

Unit tier: no Ray, no torch, milliseconds each (the job `--help` test imports the job modules).
"""

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import typing

import pytest

from mono import cli
from mono.config import (
    PRESETS,
    SECTIONS,
    Config,
    LmConfig,
    TokensConfig,
    field_types,
    from_dict,
    preset,
    with_overrides,
)

ALL_SECTIONS = tuple(SECTIONS)  # pipeline order: tokens, lm, train_lm, acts, sae, sweep, analysis
JOBS = ("tokenize_corpus", "train_lm", "collect_acts", "sweep_sae", "analyze", "pipeline")

# Numeric fields where 0 is meaningful ("0 = all", "0 disables", ...); every other numeric
# field must be > 0. A new field that allows 0 belongs here, with its docstring saying so.
ZERO_OK = {
    ("tokens", "max_docs"), ("train_lm", "min_lr"), ("train_lm", "warmup_iters"),
    ("train_lm", "weight_decay"), ("train_lm", "grad_clip"), ("train_lm", "max_failures"),
    ("train_lm", "num_workers"), ("train_lm", "threads"),
    ("acts", "n_contexts"), ("acts", "max_actors"), ("acts", "threads_per_actor"),
    ("sae", "n_steps"), ("sae", "report_interval"), ("sae", "mean_rows"),
    ("sweep", "cpus_per_trial"), ("sweep", "pack"),
    ("sweep", "gpus_per_trial"), ("sweep", "max_concurrent_trials"), ("sweep", "max_failures"),
    ("analysis", "max_rows"), ("analysis", "window"), ("analysis", "n_tasks"),
    ("analysis", "logit_min_count"), ("top", "seed"), ("splitting", "n_tasks"),
}


def _numeric_fields():
    """(section, field, type) for every int/float field, 'top' for Config's own."""
    out = [("top", f.name, field_types(Config)[f.name]) for f in dataclasses.fields(Config)
           if field_types(Config)[f.name] in (int, float)]
    for section, cls in SECTIONS.items():
        hints = field_types(cls)
        out += [(section, f.name, hints[f.name]) for f in dataclasses.fields(cls)
                if hints[f.name] in (int, float)]  # bool is its own hint, so not included
    return out


def _tuple_fields():
    return [(section, f.name) for section, cls in SECTIONS.items()
            for f in dataclasses.fields(cls)
            if typing.get_origin(field_types(cls)[f.name]) is tuple
            and typing.get_args(field_types(cls)[f.name])[0] in (int, float)]  # not names


def _set(cfg: Config, section: str, name: str, value) -> Config:
    if section == "top":
        return dataclasses.replace(cfg, **{name: value})
    return with_overrides(cfg, **{section: {name: value}})


def _owner(section: str) -> str:
    return "Config" if section == "top" else SECTIONS[section].__name__


# --- presets and cfg.json --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_cfg_json(name, tmp_path):
    cfg = preset(name)
    assert cfg.out == f"runs/{name}"
    again = Config.from_json(cfg.to_json())   # re-runs every __post_init__
    assert again == cfg
    assert isinstance(again.sweep.l1_coeff, tuple) and isinstance(again.sae.resample_at, tuple)
    path = tmp_path / "cfg.json"
    cfg.save(path)
    assert Config.load(path) == cfg
    assert json.loads(path.read_text())["tokens"]["ctx_len"] == cfg.tokens.ctx_len


def test_presets_keep_their_promises():
    tiny, demo, paper = PRESETS["tiny"], PRESETS["demo"], PRESETS["paper"]
    assert tiny.lm.d_model <= 32 and tiny.train_lm.max_iters <= 100   # seconds on 2 cores
    assert (demo.lm.d_model, demo.lm.d_mlp) == (128, 512)              # paper-shaped LM
    assert (paper.lm.d_model, paper.lm.d_mlp, paper.tokens.ctx_len) == (128, 512, 1024)
    assert paper.acts.tokens_per_context == 200                        # seed: 200 of 1024
    # one pass over the paper's data reaches all four resamples (25k ... 100k) and beyond
    paper_steps = paper.acts.n_contexts * paper.acts.tokens_per_context // paper.sae.batch_size
    assert paper.sae.resample_at == (25_000, 50_000, 75_000, 100_000)
    assert paper_steps > max(paper.sae.resample_at) + paper.sae.dead_window
    for p in (tiny, demo, paper):   # no preset's dead windows are cut short
        starts = p.sae.window_starts
        assert [s - w for s, w in zip(p.sae.resample_at, starts)] == [p.sae.dead_window] * len(
            starts)
    assert preset("tiny") is tiny
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*tiny"):
        preset("huge")


def test_from_dict_rejects_unknown_fields():
    d = PRESETS["tiny"].to_dict()
    d["sae"]["l1_coef"] = 1e-3
    with pytest.raises(ValueError, match=r"unknown SaeConfig fields: \['l1_coef'\]"):
        Config.from_dict(d)
    with pytest.raises(ValueError, match="unknown Config fields"):
        from_dict(Config, {"outt": "x"})


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "name", "hint"), _numeric_fields(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_negative_numbers_are_refused_naming_field_and_value(section, name, hint):
    bad = hint(-1)
    with pytest.raises(ValueError, match=rf"{_owner(section)}\.{name} .*{bad!r}"):
        _set(PRESETS["tiny"], section, name, bad)


@pytest.mark.parametrize(("section", "name", "hint"), _numeric_fields(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_zero_is_refused_unless_it_means_something(section, name, hint):
    zero = hint(0)
    if (section, name) in ZERO_OK:
        cfg = _set(PRESETS["tiny"], section, name, zero)
        assert getattr(cfg if section == "top" else getattr(cfg, section), name) == zero
    else:
        with pytest.raises(ValueError, match=rf"{_owner(section)}\.{name} .*{zero!r}"):
            _set(PRESETS["tiny"], section, name, zero)


@pytest.mark.parametrize(("section", "name"), _tuple_fields())
def test_tuple_fields_refuse_non_positive_items(section, name):
    item = typing.get_args(field_types(SECTIONS[section])[name])[0]
    with pytest.raises(ValueError, match=rf"{_owner(section)}\.{name}.*-1"):
        _set(PRESETS["tiny"], section, name, (item(-1),))


def test_nan_and_inf_are_refused():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"SaeConfig\.l1_coeff"):
            _set(PRESETS["tiny"], "sae", "l1_coeff", bad)


def test_cross_section_checks():
    tiny = PRESETS["tiny"]
    with pytest.raises(ValueError,
                       match=r"tokens_per_context \(65\) must be <= tokens.ctx_len \(64\)"):
        _set(tiny, "acts", "tokens_per_context", 65)
    with pytest.raises(ValueError, match=r"lm.block_size \(32\) must be >= tokens.ctx_len \(64\)"):
        _set(tiny, "lm", "block_size", 32)
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_head \(4\)"):
        LmConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match=r"min_lr \(0.1\) must be <= lr"):
        _set(tiny, "train_lm", "min_lr", 0.1)
    with pytest.raises(ValueError, match=r"ctx_len must be <= 65535, got 70000"):
        TokensConfig(ctx_len=70_000)   # tokens are stored as uint16
    with pytest.raises(ValueError, match=r"Config.out must be a directory"):
        dataclasses.replace(tiny, out="")


# --- the command line ------------------------------------------------------------------


def _parse(*argv, sections=ALL_SECTIONS) -> Config:
    return cli.parse(list(argv), "prog", "doc", sections)


def test_cli_preset_plus_overrides():
    demo = PRESETS["demo"]                          # no arguments = the demo preset, out absolute
    assert _parse() == with_overrides(demo, out=os.path.abspath(demo.out))
    cfg = _parse("--preset", "tiny", "--out", "/tmp/x", "--seed", "3", "--d_model", "64",
                 "--corpus", "a.txt")
    assert cfg == with_overrides(PRESETS["tiny"], out="/tmp/x", seed=3,
                                 lm={"d_model": 64}, tokens={"corpus": "a.txt"})


def test_cli_bare_names_follow_the_jobs_section_order():
    # All sections (the pipeline's order): bare --lr is train_lm's, the others need a prefix.
    cfg = _parse("--preset", "tiny", "--lr", "1e-2", "--sae.lr", "5e-4",
                 "--sweep.lr", "1e-4", "3e-4", "--sweep.l1_coeff", "1e-3", "3e-3")
    assert cfg.train_lm.lr == 1e-2 and cfg.sae.lr == 5e-4
    assert cfg.sweep.lr == (1e-4, 3e-4) and cfg.sweep.l1_coeff == (1e-3, 3e-3)
    # sweep_sae's order: bare --lr and --l1_coeff are the grid's.
    cfg = _parse("--preset", "tiny", "--l1_coeff", "1e-3", "3e-3", "--lr", "1e-4",
                 sections=("sweep", "sae"))
    assert cfg.sweep.l1_coeff == (1e-3, 3e-3) and cfg.sweep.lr == (1e-4,)
    assert cfg.sae == PRESETS["tiny"].sae
    # --section.field works whether or not the bare name is taken.
    cfg = _parse("--preset", "tiny", "--tokens.ctx_len", "32", "--lm.block_size", "32")
    assert cfg.tokens.ctx_len == 32 and cfg.lm.block_size == 32


def test_cli_booleans_and_empty_tuples():
    cfg = _parse("--preset", "tiny", "--wandb", "--overwrite", "false", "--acts.use_gpu", "yes")
    assert cfg.sweep.wandb is True and cfg.acts.overwrite is False and cfg.acts.use_gpu is True
    assert cfg.train_lm.use_gpu is False           # bare --use_gpu would have been train_lm's
    assert _parse("--preset", "tiny", "--resample_at").sae.resample_at == ()  # disables


@pytest.mark.parametrize(("argv", "message"), [
    (["--preset", "nope"], "unknown preset 'nope'; choose from ['demo', 'paper', 'tiny']"),
    (["--preset", "tiny", "--ctx_len", "0"], "TokensConfig.ctx_len must be positive, got 0"),
    (["--preset", "tiny", "--ctx_len", "abc"],
     "--ctx_len/--tokens.ctx_len: invalid int value: 'abc'"),
    (["--preset", "tiny", "--wandb", "maybe"], "expected true/false, got 'maybe'"),
    (["--preset", "tiny", "--seed", "-1"], "Config.seed must be >= 0, got -1"),
    (["--preset", "tiny", "--sweep.lr"], "SweepConfig grid is empty"),
    (["--preset", "tiny", "--dtype", "fp8"], "TrainLmConfig.dtype must be one of"),
    (["--preset", "tiny", "--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
])
def test_cli_errors_exit_2_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: prog" in err and message in err


def _squash(text: str) -> str:
    """Without any whitespace: argparse re-wraps help, even inside hyphenated words."""
    return "".join(text.split())


def _help(sections, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        _parse("--help", sections=sections)
    assert exc.value.code == 0
    return _squash(capsys.readouterr().out)


def test_help_shows_every_fields_docstring(capsys):
    docs = cli.field_docs()
    text = _help(ALL_SECTIONS, capsys)
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            doc = docs[(cls.__name__, f.name)]   # every field has an attribute docstring
            assert doc and _squash(doc) in text, f"{section}.{f.name}"
            assert f"--{section}.{f.name}" in text
    # A job's help lists only its own sections.
    text = _help(("tokens",), capsys)
    assert "--tokens.ctx_len" in text and "--sae.lr" not in text


def _missing_mono_module(err: ImportError) -> str | None:
    match = re.search(r"cannot import name '(\w+)' from 'mono'", str(err))
    name = f"mono.{match[1]}" if match else err.name
    if name and name.startswith("mono.") and importlib.util.find_spec(name) is None:
        return name
    return None


@pytest.mark.parametrize("job", JOBS)
def test_every_job_answers_help(job, capsys):
    """`python -m ray_jobs.<job> --help` for each job that exists so far (others skip)."""
    if importlib.util.find_spec(f"ray_jobs.{job}") is None:
        pytest.skip(f"ray_jobs/{job}.py not written yet")
    try:
        module = importlib.import_module(f"ray_jobs.{job}")
    except ImportError as err:
        # The job landed before its library: skip only while that mono module is missing
        # (`import mono.x` names it in err.name; `from mono import x` only in the message).
        missing = _missing_mono_module(err)
        if missing:
            pytest.skip(f"ray_jobs.{job} needs {missing}, not written yet")
        raise
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    text = _squash(capsys.readouterr().out)
    assert f"python-mray_jobs.{job}" in text and "--preset" in text
    docs = cli.field_docs()
    for section in getattr(module, "SECTIONS", ()):
        cls = SECTIONS[section]
        for f in dataclasses.fields(cls):
            assert _squash(docs[(cls.__name__, f.name)]) in text, f"{job}: {section}.{f.name}"


def test_cli_makes_local_out_absolute(tmp_path, monkeypatch, s3):
    """Ray workers run elsewhere: a relative --out must not follow them there."""
    monkeypatch.chdir(tmp_path)
    cfg = cli.parse(["--preset", "tiny", "--out", "rel/run"], "p", "d", ("sweep",))
    assert cfg.out == str(tmp_path / "rel" / "run")
    bucket = s3.bucket()   # a URI --out is checked for writability (tests/test_s3.py)
    cfg = cli.parse(["--preset", "tiny", "--out", f"s3://{bucket}/run"], "p", "d", ("sweep",))
    assert cfg.out == f"s3://{bucket}/run"


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--preset", "nope"], 2),
                                        (["--preset", "tiny", "--lr", "-1"], 2)])
@pytest.mark.parametrize("job", JOBS)
def test_jobs_parse_before_ray_starts(job, argv, code, capsys):
    """`--help` and bad flags answer before ray.init: the job's init hook is never called."""
    module = importlib.import_module(f"ray_jobs.{job}")
    calls = []
    with pytest.raises(SystemExit) as exc:
        module.main(argv, init=lambda: calls.append("ray.init"))
    assert exc.value.code == code and calls == []


def test_help_from_a_shell_starts_no_ray():
    """The real `python -m ray_jobs.pipeline --help`: exits 0 with no local Ray instance."""
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.pipeline", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--sweep.l1_coeff" in proc.stdout
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
