"""HTTP edges: content types, 405 with every allowed method, what an open /readyz tells, and
clients that hang up mid-request (never a 500)."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from contract.keys import new_job_id


@pytest.mark.parametrize("path", ["/generate", "/v1/videos"])
@pytest.mark.parametrize("ctype", ["text/plain", "text/plain; charset=utf-8", "application/xml"])
def test_an_unaccepted_content_type_is_415(http, path, ctype):
    r = http.post(path, content=b'{"prompt": "p"}', headers={"content-type": ctype})
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("PUT", "/jobs/{id}", {"GET", "DELETE"}),
        ("PATCH", "/v1/videos/{id}", {"GET", "DELETE"}),
        ("POST", "/jobs", {"GET"}),
        ("GET", "/generate", {"POST"}),
        ("DELETE", "/jobs/{id}/video", {"GET", "HEAD"}),
        ("GET", "/jobs/{id}/cancel", {"POST"}),
        ("PUT", "/v1/videos", {"GET", "POST"}),
    ],
)
def test_405_allow_lists_every_method_of_the_path(http, method, path, allowed):
    """`Allow` covers every route at the path (FastAPI's answer names only the first route's),
    and each method it names is really served there."""
    job_id = new_job_id()
    r = http.request(method, path.format(id=job_id))
    assert r.status_code == 405, r.text
    assert set(r.headers["allow"].replace(" ", "").split(",")) == allowed
    assert r.json()["error"]["code"] == "method_not_allowed"
    for other in allowed:
        assert http.request(other, path.format(id=job_id)).status_code != 405


def test_an_open_readyz_names_no_workers(make_server, store):
    server = make_server(API_KEYS="key-a")
    store.heartbeat("gpu-3", {"queue": "vmoba", "pid": 4242, "host": "box-7"}, ttl_s=30)
    anonymous = httpx.get(f"{server.url}/readyz", timeout=10)
    assert anonymous.status_code == 200 and anonymous.json() == {"ready": True, "workers": 1}
    for text in ("gpu-3", "4242", "box-7"):
        assert text not in anonymous.text
    wrong = httpx.get(f"{server.url}/readyz", headers={"Authorization": "Bearer nope"})
    assert wrong.json() == {"ready": True, "workers": 1}
    keyed = httpx.get(f"{server.url}/readyz", headers={"Authorization": "Bearer key-a"})
    assert keyed.json()["worker_names"] == ["gpu-3"]


def requests_with_status(http, status: str) -> float:
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("vmoba_http_requests_total{") and f'status="{status}"' in line:
            total += float(line.split()[-1])
    return total


def hang_up(server, body: bytes, declared: int) -> None:
    """Send a POST /generate announcing `declared` bytes, send `body`, then close."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(
            b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {declared}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.2)


def test_a_client_that_hangs_up_mid_body_is_not_a_500(server, http, caplog):
    before = requests_with_status(http, "500")
    for _ in range(3):
        hang_up(server, b'{"prompt": "a fox', 10_000)
    time.sleep(0.5)
    assert requests_with_status(http, "500") == before
    assert "unhandled error" not in caplog.text
    assert http.post("/generate", json={"prompt": "still fine"}).status_code == 202


def read_answer(sock: socket.socket) -> bytes:
    """What the server sends before it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_half_sent_requests_get_408_and_the_connection_back(make_server):
    server = make_server(HEADER_TIMEOUT_S=0.5, BODY_TIMEOUT_S=0.5)
    # Headers that never finish, and a connection that never says anything.
    for sent in (b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-le", b""):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(sent)
            t0 = time.monotonic()
            answer = read_answer(s)
            assert time.monotonic() - t0 < 5
            assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
    # A body that stops half-way.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"prompt": "a fox'
        )
        head, _, body = read_answer(s).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"did not arrive within 0.5 s (17 bytes came)" in body
    # Complete requests, and keep-alive between them, are unaffected.
    with httpx.Client(base_url=server.url) as http:
        for _ in range(2):
            assert http.post("/generate", json={"prompt": "fine"}).status_code == 202
            time.sleep(0.3)
