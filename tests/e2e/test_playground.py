"""The playground page (`/`, service/static/) driven in headless Chromium against a real stack.

The stack: the session's real redis-server (tests/conftest.py, on a database of its own), then
`python -m service.serve` on it (real uvicorn and a real CPU worker with the tiny model, as
tests/e2e/test_serve.py starts it), plus a second API process that requires an API key, on the
same Redis and results directory, so that the page is driven both without and with a key.

The browser is Debian's `chromium` + `chromium-driver` through selenium (`make test` installs
them; without them these tests fail and say how to install them). Set PLAYGROUND_SCREENSHOT to a
path to keep the screenshot (docs/playground.png is made that way).

The tests run in order and build on each other (one page, one stack for the module).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from stack import Stack

from service.serve import free_port

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
API_KEY = "playground-test-key"
# A database of its own on the session's redis-server: other suites flush db 0 and leave jobs
# queued there, which this stack's worker would otherwise pick up.
REDIS_DB = 7
WAIT_S = 60
# A job slow enough on a CPU to be seen running and cancelled (about 100 s on the 2-core machine
# where a step of it takes ~1 s); the tiny jobs take well under a second.
SLOW_JOB = dict(width=384, height=384, num_frames=17, num_inference_steps=100)


class PlaygroundStack(Stack):
    """test_serve's `Stack` (service.serve with the tiny model) on a given Redis, and a second
    uvicorn serving the same app with `API_KEYS` set."""

    def __init__(self, tmp: Path, redis_url: str):  # not Stack.__init__: it starts its own Redis
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "API_KEYS")}
        base.update(
            REDIS_URL=redis_url,
            DATA_DIR=str(tmp / "data"),
            MODEL="tiny",
            POLL_AFTER_MS="100",
            PYTHONPATH=str(ROOT),
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.serve"],
            cwd=ROOT,
            stdout=open(self.log, "wb"),  # noqa: SIM115 - open for the child's whole life
            stderr=subprocess.STDOUT,
            env={
                **base,
                "PORT": str(self.port),
                "API_WORKERS": "1",
                "WARMUP_STEPS": "1",
                "HEARTBEAT_INTERVAL_S": "1",
            },
        )
        self.keyed_port = free_port()
        self.keyed_url = f"http://127.0.0.1:{self.keyed_port}"
        self.keyed_log = tmp / "keyed-api.log"
        self.keyed = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "service.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.keyed_port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            # An admin key: it sees the jobs the open API made (a plain key sees only its own).
            env={**base, "ADMIN_API_KEYS": API_KEY},
            stdout=open(self.keyed_log, "wb"),  # noqa: SIM115 - open for the child's whole life
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        super().wait_ready()
        deadline = time.time() + 30
        while True:
            assert self.keyed.poll() is None, self.keyed_log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.keyed_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the keyed API did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.keyed.poll() is None:
            self.keyed.terminate()
            self.keyed.wait(timeout=30)
        super().stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium (checked first: a missing browser fails at once, with the fix)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the playground test drives Debian's "
            "chromium through chromedriver. Install them with `make browser` (apt-get "
            "install chromium chromium-driver).",
            pytrace=False,
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(
            "selenium is not installed: pip install -e '.[dev]' (make test does)", pytrace=False
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def stack(browser, redis_url, tmp_path_factory):  # the browser first: a missing one fails fast
    s = PlaygroundStack(
        tmp_path_factory.mktemp("playground"), redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def api(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def jobs():
    """Job ids by name, shared by the tests of this module (they build on each other)."""
    return {}


# -- helpers -------------------------------------------------------------------------------------


def wait(driver, condition, what: str, timeout_s: float = WAIT_S):
    """`condition(driver)` until truthy; a failure names `what` and shows the page's state."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    deadline = time.time() + timeout_s
    while True:
        try:
            value = condition(driver)
            if value:
                return value
        except StaleElementReferenceException:
            pass
        except WebDriverException as e:
            if "stale" not in str(e):
                raise
        if time.time() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {what}; page says: {page_state(driver)}"
            )
        time.sleep(0.1)


def page_state(driver) -> dict:
    return driver.execute_script("""
        const t = (id) => (document.getElementById(id) || {}).textContent;
        return {status: t('job-status'), progress: t('progress-text'), times: t('progress-times'),
                error: document.getElementById('error').hidden ? null : t('error-text'),
                dialog: document.getElementById('key-dialog').open};""")


def text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def fill(driver, **values) -> None:
    """Type into form fields by id, as a user would."""
    from selenium.webdriver.common.by import By

    for element_id, value in values.items():
        field = driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(str(value))


def choose(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def submit(driver, prompt: str, **fields) -> str:
    """Fill the form, press Generate, return the id of the job the page then shows."""
    from selenium.webdriver.common.by import By

    before = text(driver, "job-id")
    fill(driver, prompt=prompt, **fields)
    driver.find_element(By.ID, "submit").click()
    return wait(driver, lambda d: (i := text(d, "job-id")) != before and i, "the submitted job")


def video_ready(driver, selector: str) -> bool:
    """The <video> has decoded its first frame (HAVE_CURRENT_DATA or better)."""
    return driver.execute_script(
        "const v = document.querySelector(arguments[0]); return !!v && v.readyState >= 2;", selector
    )


def list_item(driver, job_id: str, what: str, action: str = "click") -> None:
    """Act on the recent-jobs entry of `job_id` (looked up afresh: the list re-renders)."""
    selector = {"open": ".job-open", "compare": ".compare-box", "delete": ".delete"}[what]
    found = driver.execute_script(
        'const e = document.querySelector(`li[data-id="${arguments[0]}"] ${arguments[1]}`);'
        "if (e) e[arguments[2]](); return !!e;",
        job_id,
        selector,
        action,
    )
    assert found, f"{what} of job {job_id} not in the list"


def listed(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#jobs > li')].map(li => li.dataset.id)"
    )


# -- the tests -----------------------------------------------------------------------------------


def test_page_and_its_files_are_served_without_a_key(stack):
    for url in (stack.url, stack.keyed_url):  # the keyed API still serves the page itself
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert '"select": "topk"' in page.text, (
            "the form's fallback attention values are written in"
        )
        for name in ("playground.js", "playground.css"):
            assert httpx.get(f"{url}/static/{name}").status_code == 200
        assert httpx.get(f"{url}/docs").status_code == 200
    assert httpx.get(f"{stack.keyed_url}/jobs").status_code == 401
    # The open /static/ prefix leads to the page's files only, even with '..' in the raw path.
    conn = http.client.HTTPConnection("127.0.0.1", stack.keyed_port, timeout=10)
    conn.request("GET", "/static/../jobs")
    assert conn.getresponse().status == 404
    conn.close()


def test_form_is_filled_from_models(browser, stack):
    browser.get(f"{stack.url}/")
    wait(
        browser,
        lambda d: d.execute_script("return document.getElementById('model').value")
        == "tiny-wan2.1-t2v",
        "GET /models to fill the model list",
    )
    values = browser.execute_script("""
        const v = (id) => document.getElementById(id).value;
        return {width: v('width'), height: v('height'), frames: v('num_frames'), fps: v('fps'),
                steps: v('num_inference_steps'), guidance: v('guidance_scale'), seed: v('seed'),
                backend: v('att-backend'), select: v('att-select'), threshold: v('att-threshold'),
                topk: v('att-topk'), dense_steps: v('att-dense-steps'),
                maxFrames: document.getElementById('num_frames').max,
                imageHidden: document.getElementById('image-field').hidden};""")
    assert values == {
        "width": "128",
        "height": "128",
        "frames": "17",
        "fps": "16",
        "steps": "4",
        "guidance": "5",
        "seed": "",
        "backend": "vmoba",
        "select": "topk",
        "threshold": "0.25",
        "topk": "1,4,12",
        "dense_steps": "0.25",
        "maxFrames": "81",
        "imageHidden": True,
    }
    assert "random-weight" in text(browser, "model-info") and "1 live worker" in text(
        browser, "model-info"
    )

    # Top-k shows its own field; dense switches the sparse settings off.
    choose(browser, "att-select", "topk")
    assert browser.execute_script(
        "return [document.getElementById('topk-field').hidden, "
        "document.getElementById('threshold-field').hidden]"
    ) == [False, True]
    choose(browser, "att-backend", "dense")
    assert browser.execute_script("return document.getElementById('att-select').disabled")
    choose(browser, "att-backend", "vmoba")
    choose(browser, "att-select", "threshold_global")

    # Every control has a label (or an aria-label), and nothing came from another origin.
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')]
          .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                       && !e.textContent.trim())
          .map(e => e.id || e.outerHTML.slice(0, 80));""")
    assert unlabelled == []
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(r => new URL(r.name).origin)"
    )
    assert origins and set(origins) == {stack.url}


def test_api_errors_are_shown_in_words(browser, stack):
    fill(browser, prompt="six frames", num_frames=6)
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "submit").click()
    message = wait(
        browser,
        lambda d: not d.find_element(By.ID, "error").get_attribute("hidden")
        and text(d, "error-text"),
        "the error message",
    )
    assert "num_frames must be of the form 4k+1" in message and "HTTP 400" in message
    assert browser.find_element(By.ID, "error").get_attribute("role") == "alert"
    browser.find_element(By.ID, "error-close").click()
    fill(browser, num_frames=17)


def test_generate_shows_progress_and_plays_the_video(browser, stack, api, jobs):
    job_id = submit(
        browser,
        "a lighthouse in a storm",
        width=64,
        height=48,
        num_frames=9,
        num_inference_steps=3,
        seed=1234,
    )
    jobs["first"] = job_id
    wait(
        browser,
        lambda d: text(d, "progress-text") == "Completed: step 3/3 · 100%",
        "the job to complete",
    )
    assert browser.execute_script("return document.getElementById('progress').value") == 100
    wait(browser, lambda d: video_ready(d, "#video"), "the <video> to load the finished video")
    src = browser.execute_script("return document.getElementById('video').currentSrc")
    assert src == f"{stack.url}/jobs/{job_id}/video"
    details = text(browser, "job-details")
    assert "64×48, 9 frames @ 16 fps" in details and "Seed1234" in details
    density = api.get(f"/jobs/{job_id}").json()["density"]
    assert f"Density{density:.3f}" in details and "denoising" in details
    assert browser.execute_script("return document.getElementById('download').href").endswith(
        f"/jobs/{job_id}/video"
    )

    # The recent-jobs list has it, with its thumbnail and settings.
    wait(
        browser,
        lambda d: d.execute_script(
            'const i = document.querySelector(`li[data-id="${arguments[0]}"] img.thumb`);'
            "return !!i && i.complete && i.naturalWidth > 0;",
            job_id,
        ),
        "the job's thumbnail",
    )
    item = browser.execute_script(
        'return document.querySelector(`li[data-id="${arguments[0]}"]`).textContent', job_id
    )
    assert "a lighthouse in a storm" in item and "vmoba threshold_global 0.25" in item


def test_queue_position_progress_and_cancel(browser, stack, api, jobs):
    from selenium.webdriver.common.by import By

    slow = submit(browser, "a slow one", **SLOW_JOB)
    jobs["slow"] = slow
    step = re.compile(r"^Step (\d+)/100 · \d+%")
    wait(browser, lambda d: step.match(text(d, "progress-text")), "live progress of the slow job")
    times = wait(
        browser,
        lambda d: "left" in (t := text(d, "progress-times")) and t,
        "the elapsed and estimated time",
    )
    assert re.fullmatch(r"elapsed \d+(\.\d)? s · about .+ left", times), times

    # A second job waits behind the slow one: the page shows its place, and cancels it.
    queued = submit(
        browser, "a queued one", width=64, height=48, num_frames=5, num_inference_steps=2
    )
    jobs["queued"] = queued
    wait(
        browser,
        lambda d: text(d, "progress-text") == "Queued: position 1 in the queue",
        "the queue position",
    )
    browser.find_element(By.ID, "cancel").click()
    wait(browser, lambda d: text(d, "job-status") == "cancelled", "the queued job to cancel")
    assert api.get(f"/jobs/{queued}").json()["status"] == "cancelled"
    assert not browser.find_element(By.ID, "cancel").is_displayed()

    # Back to the running job from the list: its progress goes on, and it is cancelled.
    list_item(browser, slow, "open")
    first = int(
        wait(
            browser,
            lambda d: (m := step.match(text(d, "progress-text"))) and m[1],
            "the slow job's progress again",
        )
    )
    wait(
        browser,
        lambda d: int((step.match(text(d, "progress-text")) or [0, 0])[1]) > first,
        "a further step from the event stream",
    )
    browser.find_element(By.ID, "cancel").click()
    final = wait(
        browser,
        lambda d: (t := text(d, "progress-text")).startswith("Cancelled") and t,
        "the running job to stop",
        timeout_s=30,
    )
    job = api.get(f"/jobs/{slow}").json()
    assert job["status"] == "cancelled" and job["step"] < 100
    assert final == f"Cancelled at step {job['step']}/100"


def test_delete_from_the_list(browser, stack, api, jobs):
    queued = jobs["queued"]
    wait(browser, lambda d: queued in listed(d), "the cancelled job in the list")
    list_item(browser, queued, "delete")  # arms the button
    assert (
        browser.execute_script(
            'return document.querySelector(`li[data-id="${arguments[0]}"] .delete`).textContent',
            queued,
        )
        == "Confirm delete"
    )
    list_item(browser, queued, "delete")
    wait(browser, lambda d: queued not in listed(d), "the deleted job to leave the list")
    assert api.get(f"/jobs/{queued}").status_code == 404
    assert jobs["first"] in listed(browser) and jobs["slow"] in listed(browser)


def test_compare_two_jobs_and_screenshot(browser, stack, api, jobs, tmp_path):
    choose(browser, "att-backend", "dense")
    dense = submit(
        browser,
        "a lighthouse in a storm, dense",
        width=64,
        height=48,
        num_frames=9,
        num_inference_steps=3,
        seed=1234,
    )
    jobs["dense"] = dense
    choose(browser, "att-backend", "vmoba")
    wait(browser, lambda d: text(d, "job-status") == "completed", "the dense job")
    wait(browser, lambda d: dense in listed(d), "the dense job in the list")

    list_item(browser, jobs["first"], "compare")
    list_item(browser, dense, "compare")
    wait(
        browser,
        lambda d: d.execute_script("return document.querySelectorAll('#compare-grid video').length")
        == 2
        and not d.execute_script("return document.getElementById('compare').hidden"),
        "two videos side by side",
    )
    wait(
        browser,
        lambda d: video_ready(d, "#compare-grid figure:nth-child(1) video")
        and video_ready(d, "#compare-grid figure:nth-child(2) video"),
        "both videos to load",
    )
    wait(
        browser,
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#compare-grid video')].every(v => !v.paused)"
        ),
        "both videos to play",
    )
    figures = browser.execute_script(
        "return [...document.querySelectorAll('#compare-grid figure')].map(f => "
        "[f.dataset.id, f.textContent, Math.round(f.getBoundingClientRect().top)])"
    )
    assert [f[0] for f in figures] == [jobs["first"], dense]
    assert "vmoba threshold_global 0.25" in figures[0][1] and "Attentiondense" in figures[1][1]
    assert figures[0][2] == figures[1][2], "side by side on a wide screen"

    # The screenshot (docs/playground.png): the whole page on a wide screen, three columns.
    list_item(browser, jobs["first"], "open")
    wait(browser, lambda d: video_ready(d, "#video"), "the first job's video")
    browser.set_window_size(1400, 1000)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(height + 150, 2400))  # + the window's own frame
    browser.execute_script("window.scrollTo(0, 0); document.activeElement.blur()")
    time.sleep(3)  # the videos' controls fade out
    shot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        shutil.copy(shot, os.environ["PLAYGROUND_SCREENSHOT"])
    browser.set_window_size(1280, 1000)


def test_phone_sized_screen(browser, stack):
    browser.set_window_size(390, 844)
    try:
        time.sleep(0.3)
        layout = browser.execute_script("""
            const r = (s) => document.querySelector(s).getBoundingClientRect();
            return {overflow: document.documentElement.scrollWidth - window.innerWidth,
                    compose: r('.compose').left, output: r('.output').left,
                    composeBottom: r('.compose').bottom, outputTop: r('.output').top,
                    compare: [...document.querySelectorAll('#compare-grid figure')]
                               .map(f => Math.round(f.getBoundingClientRect().left))};""")
        assert layout["overflow"] <= 0, "no sideways scrolling on a phone"
        assert (
            layout["compose"] == layout["output"] and layout["outputTop"] >= layout["composeBottom"]
        ), "one column"
        assert len(set(layout["compare"])) == 1, "compared videos stack on a phone"
    finally:
        browser.set_window_size(1280, 1000)


def test_api_key_is_asked_for_and_kept(browser, stack, jobs):
    from selenium.webdriver.common.by import By

    browser.get(f"{stack.keyed_url}/")  # another origin: no key stored yet
    wait(
        browser,
        lambda d: d.find_element(By.ID, "key-dialog").get_attribute("open") is not None,
        "the key dialog",
    )
    assert "missing API key" in text(browser, "key-reason")
    fill(browser, **{"key-input": "wrong-key"})
    browser.find_element(By.ID, "key-save").click()
    wait(browser, lambda d: "invalid API key" in text(d, "key-reason"), "the wrong key refused")
    fill(browser, **{"key-input": API_KEY})
    browser.find_element(By.ID, "key-save").click()
    wait(browser, lambda d: jobs["first"] in listed(d), "the jobs, listed with the key")
    assert browser.execute_script("return localStorage.getItem('vmoba-serve.apiKey')") == API_KEY
    assert (
        browser.execute_script("return document.getElementById('model').value") == "tiny-wan2.1-t2v"
    )

    # Media come as blobs fetched with the header; a job submitted here streams its progress.
    list_item(browser, jobs["first"], "open")
    wait(browser, lambda d: video_ready(d, "#video"), "the video, fetched with the key")
    assert browser.execute_script("return document.getElementById('video').src").startswith("blob:")
    wait(
        browser,
        lambda d: d.execute_script(
            'const i = document.querySelector(`li[data-id="${arguments[0]}"] img.thumb`);'
            "return !!i && i.src.startsWith('blob:') && i.naturalWidth > 0;",
            jobs["first"],
        ),
        "a thumbnail fetched with the key",
    )
    job_id = submit(browser, "with a key", width=32, height=32, num_frames=5, num_inference_steps=2)
    wait(
        browser,
        lambda d: text(d, "progress-text") == "Completed: step 2/2 · 100%",
        "the keyed job's events",
    )
    wait(browser, lambda d: video_ready(d, "#video"), "the keyed job's video")
    jobs["keyed"] = job_id

    # The key is kept: a reload asks for nothing.
    browser.refresh()
    wait(browser, lambda d: job_id in listed(d), "the list after a reload")
    assert browser.find_element(By.ID, "key-dialog").get_attribute("open") is None
