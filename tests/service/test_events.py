"""Server-Sent Events: snapshot first, live events in order, end at a terminal state, resume."""

from __future__ import annotations

import json
import threading
import time

import httpx


def read_events(url: str, headers=None, timeout=10.0) -> list[tuple[str, int | None, dict]]:
    """All events of a stream until the server closes it: `(event, id, data)`."""
    events, block = [], {}
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(":"):
                continue
            if not line:
                if block:
                    events.append((block["event"], block.get("id"), json.loads(block["data"])))
                block = {}
                continue
            name, _, value = line.partition(": ")
            block[name] = int(value) if name == "id" else value
    return events


def test_stream_follows_a_job_to_the_end(server, http, store, run_job):
    job_id = http.post("/generate", json={"prompt": "stream me"}).json()["id"]
    got = []
    reader = threading.Thread(
        target=lambda: got.extend(read_events(f"{server.url}/jobs/{job_id}/events"))
    )
    reader.start()
    time.sleep(0.3)  # the reader is subscribed and has its snapshot
    run_job(server.settings, job_id, steps=4)
    reader.join(timeout=10)
    assert not reader.is_alive(), "the stream ends at the terminal state"

    names = [e for e, _, _ in got]
    assert names == [
        "snapshot",
        "started",
        "progress",
        "progress",
        "progress",
        "progress",
        "stage",
        "stage",
        "completed",
    ]
    assert got[0][2]["status"] == "queued" and got[0][2]["object"] == "job"
    steps = [d["step"] for e, _, d in got if e == "progress"]
    assert steps == [1, 2, 3, 4]
    progress = [d["progress"] for _, _, d in got]
    assert progress == sorted(progress) and progress[-1] == 100
    ids = [i for _, i, _ in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    final = got[-1][2]
    assert final["status"] == "completed" and final["urls"]["video"].endswith("/video")

    # A finished job's stream is its snapshot alone.
    again = read_events(f"{server.url}/jobs/{job_id}/events")
    assert [e for e, _, _ in again] == ["snapshot"] and again[0][2]["status"] == "completed"

    # Resuming after event 3 replays what came later.
    resumed = read_events(
        f"{server.url}/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[3])}
    )
    assert [e for e, _, _ in resumed] == names[4:]
    # Resuming at or past the end of a finished job gives its final state, never an empty stream.
    for last in (ids[-1], ids[-1] + 1000):
        end = read_events(
            f"{server.url}/jobs/{job_id}/events", headers={"Last-Event-ID": str(last)}
        )
        assert [(e, i) for e, i, _ in end] == [("completed", ids[-1])]
        assert end[0][2]["status"] == "completed"


def test_stream_ends_on_cancel_and_on_delete(server, http, store):
    a = http.post("/generate", json={"prompt": "cancel me"}).json()["id"]
    got = []
    reader = threading.Thread(
        target=lambda: got.extend(read_events(f"{server.url}/jobs/{a}/events"))
    )
    reader.start()
    time.sleep(0.3)
    assert http.post(f"/jobs/{a}/cancel").status_code == 200
    reader.join(timeout=10)
    assert [e for e, _, _ in got] == ["snapshot", "cancelled"]
    assert got[-1][2]["error"]["code"] == "cancelled"

    b = http.post("/generate", json={"prompt": "delete me"}).json()["id"]
    store.mark_started(b, worker="w")
    got = []
    reader = threading.Thread(
        target=lambda: got.extend(read_events(f"{server.url}/jobs/{b}/events"))
    )
    reader.start()
    time.sleep(0.3)
    store.delete(b)  # as the janitor would
    reader.join(timeout=10)
    assert [e for e, _, _ in got] == ["snapshot", "deleted"]


def test_unknown_job_stream_is_404(http):
    assert http.get("/jobs/video_" + "a" * 32 + "/events").status_code == 404
