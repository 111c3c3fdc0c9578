"""Feature splitting (mono.splitting): dictionary size as a sweep axis, matching across sizes,
families, and the stage's job."""

from types import SimpleNamespace

import pytest

from mono import sweep
from mono.config import PRESETS, SweepConfig, with_overrides


def test_n_features_is_a_grid_axis_of_the_sweep():
    cfg = with_overrides(PRESETS["tiny"], sweep={"n_features": (64, 128, 256)})
    space = sweep.param_space(cfg)
    assert space["n_features"] == {"grid_search": [64, 128, 256]}
    assert space["l1_coeff"] == {"grid_search": list(cfg.sweep.l1_coeff)}
    assert "n_features" not in sweep.param_space(PRESETS["tiny"])   # empty: the base size
    trial = SimpleNamespace(config={"l1_coeff": 1e-3, "lr": 3e-4, "n_features": 128},
                            trial_id="ab12_00001")
    assert sweep.trial_dirname(trial) == "F_128_l1_0.001_lr_0.0003_ab12_00001"
    trial.config.pop("n_features")
    assert sweep.trial_dirname(trial) == "l1_0.001_lr_0.0003_ab12_00001"
    assert PRESETS["paper"].sweep.n_features == (512, 4096, 16_384, 32_768, 65_536, 131_072)
    for bad in ((0, 64), (64, 64)):
        with pytest.raises(ValueError, match="n_features"):
            SweepConfig(n_features=bad)


def test_sweep_job_takes_sizes_from_the_command_line():
    from mono import cli
    from ray_jobs import pipeline, sweep_sae

    cfg = cli.parse(["--preset", "tiny", "--n_features", "64", "128"], "x", "",
                    sweep_sae.SECTIONS)
    assert cfg.sweep.n_features == (64, 128) and cfg.sae.n_features == 256
    cfg = cli.parse(["--preset", "tiny", "--sweep.n_features", "64", "128"], "x", "",
                    pipeline.SECTIONS)
    assert cfg.sweep.n_features == (64, 128)
