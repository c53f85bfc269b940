"""Every model family's tiny twin through real worker processes and Redis, for each of its tasks;
two models on two workers, each taking only its own jobs; the defaults a job reports are the
registry's."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image
from worker_helpers import live_worker, submit, wait_status, worker_env

from contract.enqueue import queue_name
from contract.models import REGISTRY
from contract.store import JobStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

# (model, task) for every tiny twin and every task it does.
CASES = [(s.id, task) for s in REGISTRY.values() if s.weights == "tiny" for task in s.tasks]


def first_frame(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def test_every_tiny_family_runs_each_task_through_a_worker(
    redis_url, redis_client, tmp_path, procs
):
    seed = random.randrange(2**31)
    models = sorted({m for m, _ in CASES})
    env = worker_env(
        redis_url, tmp_path / "data", MODEL=",".join(models), WORKER_NAME="families", WARMUP_STEPS=0
    )
    worker = procs("worker.run", env, tmp_path / "worker.log")
    store = JobStore(redis_client)
    live_worker(store, lambda w: w["name"] == "families", timeout_s=240)
    jobs = {}
    for model, task in CASES:
        size = 2 * REGISTRY[model].size_multiple  # the smallest size with a 2x2 latent grid
        job_id = submit(
            redis_client,
            model=model,
            task=task,
            queue=queue_name("vmoba", model),
            width=size,
            height=size,
            seed=seed,
            num_inference_steps=2,
        )
        if task == "i2v":
            store.put_input_image(job_id, first_frame(size, size, seed))
        jobs[(model, task)] = job_id
    for (model, task), job_id in jobs.items():
        rec = wait_status(store, job_id, ("completed", "failed"), timeout_s=180)
        assert rec.status == "completed", (
            model,
            task,
            seed,
            rec.error_message,
            worker.text()[-2000:],
        )
        data = tmp_path / "data" / "jobs" / job_id
        meta = json.loads((data / "meta.json").read_text())
        assert meta["task"] == task and meta["model"]["model"] == model
        assert (data / "input.png").exists() == (task == "i2v")
        assert rec.attention["sources"]["select"] == "model", rec.attention
        assert 0 < rec.density <= 1


def test_two_models_on_two_workers_each_take_their_own_jobs(
    redis_url, redis_client, tmp_path, procs
):
    store = JobStore(redis_client)
    for name, model in (("w-t2v", "tiny"), ("w-ti2v", "tiny-wan2.2-ti2v")):
        env = worker_env(redis_url, tmp_path / name, MODEL=model, WORKER_NAME=name, WARMUP_STEPS=0)
        procs("worker.run", env, tmp_path / f"{name}.log")
        live_worker(store, lambda w, n=name: w["name"] == n, timeout_s=240)
    a = submit(redis_client, model="tiny-wan2.1-t2v", queue=queue_name("vmoba", "tiny-wan2.1-t2v"))
    b = submit(
        redis_client,
        model="tiny-wan2.2-ti2v",
        width=64,
        height=64,
        queue=queue_name("vmoba", "tiny-wan2.2-ti2v"),
    )
    ra = wait_status(store, a, ("completed", "failed"), timeout_s=120)
    rb = wait_status(store, b, ("completed", "failed"), timeout_s=120)
    assert (ra.status, ra.worker) == ("completed", "w-t2v")
    assert (rb.status, rb.worker) == ("completed", "w-ti2v")


def test_default_settings_are_the_registrys(rt, redis_client):
    """Stock Wan 2.1 at 720p reports the paper's top-k (2, 10, 9): the model layer of the merge."""
    from contract.models import get_model

    spec = get_model("wan2.1-t2v-1.3b")
    loaded = rt.model("tiny-wan2.1-t2v")
    grid = spec.grid(81, 720, 1280)
    settings, sources = rt.attention_settings(
        type(loaded)(spec, loaded.pipes, loaded.handle, loaded.info), grid, {}
    )
    assert (settings.select, settings.topk, settings.dense_steps) == ("topk", (2, 10, 9), 0.25)
    assert sources["topk"] == sources["select"] == "model" and sources["kernel"] == "operator"
    settings, sources = rt.attention_settings(loaded, grid, {"select": "threshold_global"})
    assert settings.select == "threshold_global" and sources["select"] == "request"
