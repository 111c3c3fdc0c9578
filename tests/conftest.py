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


class S3Server:
    """A real S3 endpoint on 127.0.0.1 (moto's server mode) and a client for setting it up."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, **kw):
        import boto3

        args = {"endpoint_url": self.endpoint, "region_name": "us-east-1",
                "aws_access_key_id": "test", "aws_secret_access_key": "test"} | kw
        return boto3.client(args.pop("service", "s3"), **args)

    def bucket(self, prefix: str = "mono") -> str:
        """A new, empty bucket; its name."""
        import uuid

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    """moto's ThreadedMotoServer on 127.0.0.1 for the session (~0.3 s), or None without moto.

    Its endpoint and fake credentials go into os.environ here, before `ray_local` starts
    Ray (which depends on this fixture), because Ray workers inherit the environment of the
    process that starts Ray: pyarrow's S3 filesystem in every worker finds the server
    through AWS_ENDPOINT_URL. AWS_EC2_METADATA_DISABLED keeps the SDK from asking the EC2
    metadata address for credentials: nothing leaves 127.0.0.1.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(f"http://{host}:{port}")
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    yield s3
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3(s3_server):
    if s3_server is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    return s3_server


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One `ray.init(address="local")` for the whole session (start/stop costs seconds).

    Starts after `s3_server`, so every Ray worker reaches the localhost S3 endpoint.

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


@pytest.fixture(scope="session")
def tiny_reference(ray_local, tmp_path_factory):
    """The tiny pipeline run once on this one node with a local --out: what the object-
    storage and autoscaling tests compare their runs against. -> (out dir, corpus path)."""
    from test_pipeline import _corpus

    from ray_jobs import pipeline

    root = tmp_path_factory.mktemp("tiny-reference")
    corpus = _corpus(root / "corpus.txt")
    results = pipeline.main(["--preset", "tiny", "--out", str(root / "run"),
                             "--corpus", str(corpus)])
    # splitting runs only when the sweep has >= 2 dictionary sizes (the tiny one has one)
    assert all(r["ran"] for r in results if r["stage"] != "splitting"), results
    return str(root / "run"), corpus


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
