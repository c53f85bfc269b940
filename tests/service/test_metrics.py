"""/metrics in Prometheus text format changes after jobs; the API process never imports torch."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families


def samples(http) -> dict:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_change_after_a_job(server, http, store, run_job):
    before = samples(http)
    job_id = http.post("/generate", json={"prompt": "count me"}).json()["id"]
    mid = samples(http)
    assert mid[("vmoba_queue_depth", ())] == before[("vmoba_queue_depth", ())] + 1
    run_job(server.settings, job_id, steps=3)
    store.heartbeat("w", {"queue": "vmoba"}, ttl_s=5)
    after = samples(http)

    done = ("vmoba_jobs_finished_total", (("status", "completed"),))
    assert after[done] == before.get(done, 0) + 1
    assert after[("vmoba_queue_depth", ())] == before[("vmoba_queue_depth", ())]
    assert after[("vmoba_live_workers", ())] == 1
    step_sum = ("vmoba_denoising_step_seconds_sum", ())
    assert abs(after[step_sum] - before[step_sum] - 0.1) < 1e-9, "0.3 s over 3 steps"
    total = ("vmoba_job_stage_seconds_count", (("stage", "total"),))
    assert after[total] == before[total] + 1
    submitted = ("vmoba_jobs_submitted_total", ())
    assert after[submitted] >= before.get(submitted, 0) + 1
    posts = (
        "vmoba_http_requests_total",
        (("method", "POST"), ("route", "/generate"), ("status", "202")),
    )
    assert after[posts] >= before.get(posts, 0) + 1
    gets = [
        k for k in after if k[0] == "vmoba_http_requests_total" and ("route", "/metrics") in k[1]
    ]
    assert gets, "requests are labelled by route template"


def test_api_never_imports_torch():
    code = (
        "import sys, service.app, service.serve, service.cli; service.app.create_app(); "
        "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
