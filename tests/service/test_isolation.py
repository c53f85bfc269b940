"""Per-key isolation (`API_KEYS=k1,k2`): a job belongs to the key that created it; every other
key gets the same 404 as for a job that does not exist, on every route, and never sees it in a
listing; an `ADMIN_API_KEYS` key sees and manages every job."""

from __future__ import annotations

import httpx
import pytest

from contract.keys import new_job_id, owner_id

KEYS = {"alice": "key-alice", "bob": "key-bob", "root": "key-root"}


def client(server, who: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {KEYS[who]}"}
    )


@pytest.fixture
def keyed(make_server):
    return make_server(API_KEYS="key-alice,key-bob", ADMIN_API_KEYS="key-root")


def job_routes(job_id: str) -> list[tuple[str, str]]:
    """Every route that names one job (method, path)."""
    return [
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/events"),
        ("GET", f"/jobs/{job_id}/video"),
        ("HEAD", f"/jobs/{job_id}/video"),
        ("GET", f"/jobs/{job_id}/thumbnail"),
        ("HEAD", f"/jobs/{job_id}/thumbnail"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("DELETE", f"/jobs/{job_id}"),
        ("GET", f"/v1/videos/{job_id}"),
        ("GET", f"/v1/videos/{job_id}/content"),
        ("HEAD", f"/v1/videos/{job_id}/content"),
        ("GET", f"/v1/videos/{job_id}/content?variant=thumbnail"),
        ("DELETE", f"/v1/videos/{job_id}"),
    ]


def listed(http: httpx.Client) -> set[str]:
    ids = set()
    for path in ("/jobs", "/v1/videos"):
        for order in ("desc", "asc"):
            page = http.get(path, params={"limit": 100, "order": order})
            assert page.status_code == 200, page.text
            ids |= {item["id"] for item in page.json()["data"]}
    return ids


def test_another_keys_job_is_invisible_on_every_route(keyed, store, run_job):
    with client(keyed, "alice") as alice, client(keyed, "bob") as bob:
        done = alice.post("/generate", json={"prompt": "alice's done"}).json()["id"]
        running = alice.post("/v1/videos", json={"prompt": "alice's running"}).json()["id"]
        waiting = alice.post("/generate", json={"prompt": "alice's waiting"}).json()["id"]
        run_job(keyed.settings, done)
        assert store.mark_started(running, worker="w")
        store.heartbeat("w", {"queue": "vmoba", "models": ["tiny-wan2.1-t2v"], "job_id": running})
        mine = bob.post("/generate", json={"prompt": "bob's"}).json()["id"]

        # The record names its owner by a hash of the key, never the key itself.
        rec = store.get(done)
        assert rec.owner == owner_id("key-alice") and store.get(mine).owner == owner_id("key-bob")
        raw = b"".join(v for v in store.redis.hgetall(f"vmoba:job:{done}").values())
        assert b"key-alice" not in raw

        ghost = new_job_id()
        for job_id in (done, running, waiting):
            for method, path in job_routes(job_id):
                r = bob.request(method, path)
                missing = bob.request(method, path.replace(job_id, ghost))
                assert r.status_code == 404, (method, path, r.status_code, r.text)
                if method != "HEAD":  # the same answer as for a job that does not exist
                    assert r.json() == {
                        "error": {
                            **missing.json()["error"],
                            "message": missing.json()["error"]["message"].replace(ghost, job_id),
                        }
                    }
        assert listed(bob) == {mine}
        assert listed(alice) == {done, running, waiting}
        # Paging after another key's job is refused like any unknown cursor.
        assert bob.get("/jobs", params={"after": done}).status_code == 404
        # Nor does the live worker give the running job's id away.
        workers = bob.get("/models").json()["data"][0]["workers"]
        assert workers and all("job_id" not in w for w in workers)

        # Bob's attempts changed nothing: cancel and delete did not reach alice's jobs.
        assert store.get(waiting).status == "queued" and not store.is_cancel_requested(running)
        assert alice.get(f"/jobs/{done}/video").status_code == 200
        assert alice.get(f"/v1/videos/{done}/content?variant=thumbnail").status_code == 200
        assert alice.get(f"/jobs/{running}").json()["status"] == "in_progress"
        assert alice.post(f"/jobs/{waiting}/cancel").status_code == 200
        assert bob.get(f"/jobs/{mine}").status_code == 200
        assert alice.get(f"/jobs/{mine}").status_code == 404


def test_an_admin_key_sees_and_manages_every_job(keyed, store, run_job):
    with (
        client(keyed, "alice") as alice,
        client(keyed, "bob") as bob,
        client(keyed, "root") as root,
    ):
        a = alice.post("/generate", json={"prompt": "a"}).json()["id"]
        b = bob.post("/generate", json={"prompt": "b"}).json()["id"]
        own = root.post("/generate", json={"prompt": "root's"}).json()["id"]
        run_job(keyed.settings, a)
        assert {a, b, own} <= listed(root)
        assert own not in listed(alice) | listed(bob)
        assert root.get(f"/jobs/{a}/video").status_code == 200
        assert root.get(f"/v1/videos/{b}").json()["status"] == "queued"
        assert root.post(f"/jobs/{b}/cancel").status_code == 200
        assert root.delete(f"/v1/videos/{a}").json()["deleted"] is True
        assert alice.get(f"/jobs/{a}").status_code == 404  # deleted for real
        assert listed(alice) == set()
        store.heartbeat("w", {"queue": "vmoba", "models": ["tiny-wan2.1-t2v"], "job_id": b})
        assert root.get("/models").json()["data"][0]["workers"][0]["job_id"] == b


def test_without_keys_everyone_shares_every_job(server, http):
    job_id = http.post("/generate", json={"prompt": "shared"}).json()["id"]
    other = httpx.get(
        f"{server.url}/jobs/{job_id}", headers={"Authorization": "Bearer whatever"}, timeout=10
    )
    assert other.status_code == 200
    assert job_id in {j["id"] for j in http.get("/jobs").json()["data"]}


def test_an_idempotent_retry_stays_with_its_key(keyed):
    with client(keyed, "alice") as alice, client(keyed, "bob") as bob:
        headers = {"Idempotency-Key": "same"}
        a = alice.post("/generate", json={"prompt": "p"}, headers=headers).json()["id"]
        b = bob.post("/generate", json={"prompt": "p"}, headers=headers).json()["id"]
        again = alice.post("/generate", json={"prompt": "p"}, headers=headers)
        assert a != b and again.json()["id"] == a
        assert again.headers["idempotent-replayed"] == "true"
        assert bob.get(f"/jobs/{a}").status_code == 404


def test_owner_index_pages_and_follows_deletes(store):
    """The store: each owner's listing pages over its own jobs only, and a delete (API or
    retention) takes the job out of its owner's index too."""
    ids = {
        who: [store.create({"prompt": f"{who}{i}"}, model="tiny", owner=who)[1] for i in range(5)]
        for who in ("o1", "o2")
    }
    seen, after, more = [], None, True
    while more:
        page, more = store.list(limit=2, after=after, owner="o1")
        seen += [rec.id for rec, _ in page]
        after = seen[-1]
    assert seen == ids["o1"][::-1]
    assert {rec.id for rec, _ in store.list(limit=100)[0]} == set(ids["o1"] + ids["o2"])
    assert store.delete(ids["o1"][0])
    assert ids["o1"][0] not in {rec.id for rec, _ in store.list(limit=100, owner="o1")[0]}
    assert not store.redis.zscore("vmoba:jobs:owner:o1", ids["o1"][0])
