"""`ray job submit` for real: a private Ray head, the job CLI, token auth, a clean teardown.

What a user does against `cluster.yaml`, on one machine: start a head (`ray start --head`),
submit stage 1 with `--working-dir` = the repo root, wait for SUCCEEDED (the CLI blocks and
exits 0/1 with the job), read the token shards it wrote.

Sharing the machine with other sessions shapes the fixture:
- every port is a free one (Ray's defaults 6379/8265/10001/... clash with any other Ray here);
- a private `--temp-dir` (short: Ray's unix socket paths are length-limited) and RAY_TMPDIR,
  so the head records its address there and never in /tmp/ray, where a bare `ray.init()` of
  another session would find it and attach;
- auth: RAY_AUTH_MODE=token with a token made up for this test in RAY_AUTH_TOKEN, for the
  head and the client alike. That is how cluster.yaml runs (Ray 2.61 turns token auth on
  everywhere), and it never reads or writes ~/.ray/auth_token, which other sessions share.
  (RAY_AUTH_MODE=disabled on both sides works as well; the token alone, without the mode,
  does not: RAY_NOTES.md §0.)
- teardown stops only what the test started, never `ray stop` (which stops every Ray on the
  machine): the head runs in its own PID namespace (`unshare --pid --fork --mount-proc
  --kill-child`, root only), so killing unshare kills the namespace's PID 1 (`ray start`)
  and with it every process the head and the job spawned. Without unshare, the head's
  process group is killed and a sweep kills whatever still carries this test's RAY_TMPDIR.
  Either way the test then asserts, from /proc, that no process of ours is left.
"""

import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_cluster import free_ports

from mono.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent   # `ray` and the `python` every job process runs
START_TIMEOUT_S = 90

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@dataclass
class Head:
    url: str                 # the dashboard / job server, http://127.0.0.1:<port>
    env: dict                # environment for clients: same auth mode and token as the head
    temp_dir: str
    proc: subprocess.Popen   # `unshare ... ray start --head --block`, or `ray start` itself


def _free_port_range(n: int) -> int:
    """First port of n consecutive free ports (Ray's worker port range)."""
    for _ in range(50):
        base = random.randrange(20_000, 30_000 - n)
        try:
            _free_ports_exact(range(base, base + n))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports in 20000-30000")


def _free_ports_exact(ports) -> None:
    socks = []
    try:
        for p in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("", p))   # raises OSError when taken
    finally:
        for s in socks:
            s.close()


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def _ours(marker: str) -> list[int]:
    """PIDs (as seen from here) whose environment or command line carries `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:   # gone, or not ours to read
            continue
        if marker.encode() in blob:
            pids.append(int(entry.name))
    return pids


def _start_head(unshare: bool) -> Head:
    temp_dir = tempfile.mkdtemp(prefix="rjs-", dir="/tmp")   # short: socket paths <= 107 bytes
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_TMPDIR=temp_dir,
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    names = ["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "node-manager-port", "object-manager-port",
             "runtime-env-agent-port", "metrics-export-port"]
    ports = dict(zip(names, free_ports(len(names))))
    base = _free_port_range(100)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
           "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--temp-dir", temp_dir, "--object-store-memory", str(256 * 1024**2),
           "--min-worker-port", str(base), "--max-worker-port", str(base + 99),
           "--disable-usage-stats"]
    cmd += [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    if unshare:
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *cmd]
    log = open(Path(temp_dir) / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return Head(f"http://127.0.0.1:{ports['dashboard-port']}", env, temp_dir, proc)


def _wait_ready(head: Head) -> None:
    """Until the job server answers (it needs the token too), or the head dies."""
    token = head.env["RAY_AUTH_TOKEN"]
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            break
        req = urllib.request.Request(f"{head.url}/api/version",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if json.load(r).get("ray_version"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    log = (Path(head.temp_dir) / "head.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"Ray head not ready after {START_TIMEOUT_S} s "
                       f"(exit code {head.proc.poll()}):\n{log}")


def _stop_head(head: Head, unshare: bool) -> None:
    """Kill everything the head started, and nothing else."""
    if unshare:
        # SIGKILL to unshare: --kill-child SIGKILLs `ray start`, the namespace's PID 1, and
        # the kernel then kills every process left in the namespace. (A SIGTERM would not do:
        # a namespace's PID 1 ignores signals it has no handler for.)
        head.proc.kill()
        head.proc.wait(timeout=30)
    else:
        # `ray start --block` leads its own session (start_new_session); its Ray processes
        # inherit the group, and the reaper Ray spawns with --block kills the rest.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.proc.pid, sig)
                head.proc.wait(timeout=10)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
    for pid in _ours(head.temp_dir):   # only ever non-empty without a PID namespace
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ray_head():
    if not (VENV_BIN / "ray").exists():
        pytest.skip(f"no `ray` CLI next to {sys.executable}")
    unshare = _can_unshare()
    t0 = time.perf_counter()
    head = _start_head(unshare)
    try:
        _wait_ready(head)
        print(f"head ready in {time.perf_counter() - t0:.1f} s (PID namespace: {unshare})")
        yield head
    finally:
        t1 = time.perf_counter()
        _stop_head(head, unshare)
        print(f"head stopped in {time.perf_counter() - t1:.1f} s")
        deadline = time.monotonic() + 10
        while _ours(head.temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _ours(head.temp_dir)
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    words = ("feature neuron sparse dictionary token context layer residual activation "
             "autoencoder superposition monosemantic model attention").split()
    paras = [" ".join(rng.choice(words) for _ in range(rng.randrange(40, 120))) + "."
             for _ in range(64)]
    path.write_text("\n\n".join(paras))   # blank lines separate documents
    return path


def _submit(head: Head, *entrypoint: str, submission_id: str) -> subprocess.CompletedProcess:
    runtime_env = {"excludes": [".venv", ".git", "runs"],
                   "env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}}
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.url,
           "--submission-id", submission_id, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    return subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=240)


def test_tokenize_corpus_via_ray_job_submit(ray_head, tmp_path):
    out = tmp_path / "run"
    corpus = _corpus(tmp_path / "corpus.txt")
    job_id = f"mono-test-{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    job = ["python", "-m", "ray_jobs.tokenize_corpus", "--preset", "tiny", "--out", str(out),
           "--corpus", str(corpus)]
    # The user's command, behind a shell that first says which `python` the job resolves.
    script = f'echo "job python: $(command -v python)" && {shlex.join(job)}'
    r = _submit(ray_head, "sh", "-c", script, submission_id=job_id)
    wall = time.perf_counter() - t0
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-4000:]
    assert f"Job '{job_id}' succeeded" in logs
    # The job ran with this venv's python: the head puts it first on PATH.
    assert f"job python: {VENV_BIN / 'python'}" in logs
    manifest = json.loads((out / "tokens" / "manifest.json").read_text())
    assert manifest["ctx_len"] == PRESETS["tiny"].tokens.ctx_len
    assert manifest["corpus"] == str(corpus)
    for split in ("train", "val"):
        files = manifest["splits"][split]["files"]
        assert files and manifest["rows"][split] == sum(f["rows"] for f in files) > 0
        for f in files:
            assert (out / "tokens" / split / f["name"]).stat().st_size > 0
    print(f"ray job submit, tokenize tiny: {wall:.1f} s")
