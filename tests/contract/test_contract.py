"""What the API and the workers agree on stays one definition: the HTTP schema's attention
choices equal `vmoba`'s, the request names only settings `vmoba` knows, and the store's two
drivers run the same operations."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from contract import request as contract_request
from contract.keys import new_job_id
from contract.request import AttentionRequest, GenerateRequest, Limits
from contract.store import AsyncJobStore, JobStore


def test_attention_choices_match_vmoba():
    from vmoba import config

    assert contract_request.ATTENTION_BACKENDS == config.ATTENTION_BACKENDS
    assert contract_request.SELECT_MODES == config.SELECT_MODES
    fields = AttentionRequest.model_fields
    assert fields["backend"].annotation is not None
    literal_choices = {
        name: tuple(
            arg for arg in fields[name].annotation.__args__[0].__args__
        )  # Optional[Literal]
        for name in ("backend", "select")
    }
    assert literal_choices == {"backend": config.ATTENTION_BACKENDS, "select": config.SELECT_MODES}


def test_request_fields_are_attention_settings_fields():
    from vmoba.config import AttentionSettings

    known = {f.name for f in dataclasses.fields(AttentionSettings)}
    assert set(AttentionRequest.model_fields) <= known


def test_request_leaves_defaults_to_vmoba():
    """No attention default is decided in the contract: every field is unset unless given."""
    req = GenerateRequest.model_validate({"prompt": "p"}, context={"limits": Limits()})
    assert req.attention.overrides() == {}
    assert all(f.default is None for f in AttentionRequest.model_fields.values())


@pytest.fixture
def async_client(redis_url):
    import redis.asyncio as aredis

    return aredis.Redis.from_url(redis_url)


def test_sync_and_async_stores_agree(redis_client, async_client):
    """One job driven by both stores: each sees what the other wrote, in the same shape."""
    sync_store = JobStore(redis_client, retention_s=120)
    async_store = AsyncJobStore(async_client, retention_s=120)
    job_id = new_job_id()

    async def flow():
        created = await async_store.create(
            {"prompt": "p", "num_inference_steps": 3}, model="tiny", seed=5, job_id=job_id
        )
        assert created.outcome == "created" and created.position == 1
        assert sync_store.mark_started(job_id, worker="w1")
        assert sync_store.mark_progress(job_id, 2, 3)
        rec, pos, cancel = await async_store.get_full(job_id)
        assert (rec.status, rec.step, rec.worker, pos, cancel) == (
            "in_progress",
            2,
            "w1",
            None,
            False,
        )
        assert sync_store.get_full(job_id)[0] == rec
        await async_store.request_cancel(job_id)
        assert sync_store.is_cancel_requested(job_id)
        assert not await async_store.mark_cancelled(job_id, allowed=("queued",))
        assert sync_store.mark_cancelled(job_id)
        assert (
            [e["type"] for e in await async_store.events_since(job_id)]
            == [e["type"] for e in sync_store.events_since(job_id)]
            == ["started", "progress", "cancelled"]
        )
        assert (await async_store.metrics_snapshot()) == sync_store.metrics_snapshot()
        await async_client.aclose()

    asyncio.run(flow())
