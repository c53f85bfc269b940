"""Server-Sent Events for one job: the current snapshot first, then live events, until it ends.

Wire format (one event per blank-line-separated block):

```
id: 7
event: snapshot | started | progress | stage | requeued | completed | failed | cancelled | deleted
       | unavailable
data: {...}
```

- `snapshot` (first, unless resuming): the native job object (`views.job_view`).
- live events: the store's event (`{seq, type, job_id, ts, status, stage, progress, step,
  total_steps, ...}`); the terminal ones (`completed`, `failed`, `cancelled`) carry the full job
  object instead, and the stream ends after them.
- `id` is the record's event sequence number; a client that reconnects with `Last-Event-ID` gets
  the events it missed (from the replay list) instead of a snapshot.
- Idle streams get a `: ping` comment every `SSE_PING_S` seconds; a job deleted meanwhile ends the
  stream with a `deleted` event.
- If Redis goes away mid-stream, the stream ends with an `unavailable` event (and a `retry`
  hint): the client reconnects with `Last-Event-ID` and misses nothing.

The channel is subscribed before the snapshot is read, so no event falls between the two; events
already covered by the snapshot (seq not above it) are skipped.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Optional

import anyio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract.keys import events_channel
from contract.status import TERMINAL_VALUES

from .state import AppState
from .views import job_view

# How long a client should wait before reconnecting after an `unavailable` event.
RECONNECT_MS = 1000


def sse(event: str, data: dict, id_: Optional[int] = None) -> bytes:
    head = f"id: {id_}\n" if id_ is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def job_events(
    state: AppState, job_id: str, last_event_id: Optional[int] = None
) -> AsyncIterator[bytes]:
    try:
        async for chunk in _job_events(state, job_id, last_event_id):
            yield chunk
    except (RedisConnectionError, RedisTimeoutError):
        yield b"retry: %d\n" % RECONNECT_MS + sse(
            "unavailable",
            {"message": "Redis is unavailable; reconnect with Last-Event-ID to resume"},
        )


async def _job_events(
    state: AppState, job_id: str, last_event_id: Optional[int] = None
) -> AsyncIterator[bytes]:
    store = state.store
    pubsub = state.redis.pubsub()
    await pubsub.subscribe(events_channel(job_id))
    try:
        rec, pos, cancel = await store.get_full(job_id)
        if rec is None:
            yield sse("deleted", {"id": job_id})
            return
        if last_event_id is None:
            yield sse("snapshot", job_view(rec, pos, cancel_requested=cancel), rec.seq)
            if rec.is_terminal:
                return
            last_seq = rec.seq
        else:
            # An id past the record's (another server's, or made up) resumes from now.
            last_seq = min(last_event_id, rec.seq)
            for ev in await store.events_since(job_id, last_seq):
                last_seq = max(last_seq, ev["seq"])
                if ev["type"] in TERMINAL_VALUES:
                    yield sse(ev["type"], job_view(rec, pos, cancel_requested=cancel), ev["seq"])
                    return
                yield sse(ev["type"], ev, ev["seq"])
            if rec.is_terminal:  # its terminal event was seen already or left the replay list:
                # the stream of an ended job always ends with its final state, never empty
                yield sse(rec.status, job_view(rec, pos, cancel_requested=cancel), rec.seq)
                return
        while True:
            msg = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=state.settings.SSE_PING_S
            )
            if msg is None:
                if await store.get(job_id) is None:
                    yield sse("deleted", {"id": job_id})
                    return
                yield b": ping\n\n"
                continue
            ev = json.loads(msg["data"])
            seq = ev.get("seq", 0)
            if seq <= last_seq:
                continue
            last_seq = seq
            if ev.get("type") in TERMINAL_VALUES:
                rec, pos, cancel = await store.get_full(job_id)
                body = job_view(rec, pos, cancel_requested=cancel) if rec else ev
                yield sse(ev["type"], body, seq)
                return
            yield sse(ev["type"], ev, seq)
    finally:
        with anyio.CancelScope(shield=True):
            await pubsub.unsubscribe()
            await pubsub.aclose()
