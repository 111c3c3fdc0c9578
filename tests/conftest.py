"""Shared fixtures: one local Ray instance per test session, seeds, offline Hugging Face."""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One `ray.init(address="local")` for the whole session (start/stop costs seconds).

    4 logical CPUs on a 2-core box, so an actor pool or trials never take every CPU the
    read/write tasks need (RAY_NOTES.md §7). A private temp dir keeps our sockets and logs
    away from any other Ray on the machine; we never `ray stop`.
    """
    import ray

    tmp = tempfile.mkdtemp(prefix="mono-ray-", dir="/tmp")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 1024**2, _temp_dir=tmp)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seeded():
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass
