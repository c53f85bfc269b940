// The playground page (service/static/index.html), plain JavaScript, no dependencies.
//
// It is a client of the native API like any other: GET /models (fields, limits, defaults),
// POST /generate, GET /jobs/{id}/events (Server-Sent Events, read with fetch() so that an API key
// can go in the Authorization header, which EventSource cannot send), POST /jobs/{id}/cancel,
// GET /jobs (recent jobs), DELETE /jobs/{id}, and the job's video and thumbnail (fetched as blobs
// with the header when a key is in use). A 401 makes the page ask for the key, which it keeps in
// localStorage. See docs/playground.md.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "vmoba-serve.apiKey";
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const JOB_ID = /^video_[0-9a-f]{32}$/;
  const LIST_LIMIT = 20;
  const LIST_REFRESH_MS = 3000;
  // The server's AttentionRequest defaults, written into the page by service/routes/page.py;
  // a model's own `attention_defaults` (when /models lists them) take precedence.
  const ATTENTION_DEFAULTS = readDefaults();

  const state = {
    models: [],
    model: null,
    shown: null,            // the job in the "Job" panel: {id, job, abort, steps, skew, timers}
    jobs: [],               // the last GET /jobs page
    compare: [],            // ids ticked "compare", oldest first (at most two)
    media: new Map(),       // path -> object URL, for media fetched with the API key
    listing: null,
    listAgain: false,
  };

  function readDefaults() {
    const fallback = { backend: "vmoba", select: "threshold_global", threshold: 0.25,
                       topk: [2, 6, 18], dense_steps: 0.25 };
    try {
      return { ...fallback, ...JSON.parse($("attention-defaults").textContent) };
    } catch (e) {
      return fallback;
    }
  }

  // -- API ---------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function getKey() {
    try { return localStorage.getItem(KEY_STORE) || ""; } catch (e) { return ""; }
  }

  function setKey(key) {
    try {
      if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    } catch (e) { /* storage disabled: the key lasts until the page is left */ }
    memoryKey = key;
  }
  let memoryKey = "";
  const currentKey = () => getKey() || memoryKey;

  async function errorText(response) {
    let message = "";
    try {
      const body = await response.json();
      message = body && body.error && body.error.message;
    } catch (e) { /* not JSON */ }
    return `${message || response.statusText || "error"} (HTTP ${response.status})`;
  }

  // fetch() with the key, JSON in and out, the error envelope turned into an ApiError; a 401
  // asks for a key and tries again.
  async function api(path, { method = "GET", json, headers = {}, signal, raw = false } = {}) {
    for (;;) {
      const h = { ...headers };
      const key = currentKey();
      if (key) h.Authorization = `Bearer ${key}`;
      let body;
      if (json !== undefined) {
        h["Content-Type"] = "application/json";
        body = JSON.stringify(json);
      }
      let response;
      try {
        response = await fetch(path, { method, headers: h, body, signal, cache: "no-store" });
      } catch (err) {
        if (signal && signal.aborted) throw err;
        throw new ApiError(0, `the server did not answer (${err.message})`);
      }
      if (response.status === 401) {
        const message = await errorText(response);
        if (await askForKey(`The server refused the request: ${message}`)) continue;
        throw new ApiError(401, message);
      }
      if (!response.ok) throw new ApiError(response.status, await errorText(response));
      return raw ? response : response.json();
    }
  }

  // A URL for a job's video or thumbnail: the path itself without a key; with one, an object URL
  // of the file fetched with the Authorization header (a <video> or <img> cannot send it).
  async function mediaUrl(path) {
    if (!currentKey()) return path;
    let url = state.media.get(path);
    if (!url) {
      const response = await api(path, { raw: true });
      url = URL.createObjectURL(await response.blob());
      state.media.set(path, url);
    }
    return url;
  }

  function forgetMedia(jobId) {
    for (const [path, url] of state.media) {
      if (path.startsWith(`/jobs/${jobId}/`)) {
        URL.revokeObjectURL(url);
        state.media.delete(path);
      }
    }
  }

  // Server-Sent Events over fetch(): calls onEvent(type, data, id) per event until it returns
  // true; reconnects with Last-Event-ID when the stream drops.
  async function streamEvents(jobId, onEvent, signal) {
    let lastId = null;
    let failures = 0;
    while (!signal.aborted) {
      try {
        const headers = { Accept: "text/event-stream" };
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const response = await api(`/jobs/${jobId}/events`, { raw: true, headers, signal });
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          failures = 0;
          buf += value;
          const tail = buf.endsWith("\r") ? "\r" : "";
          buf = buf.slice(0, buf.length - tail.length).replace(/\r\n?/g, "\n") + tail;
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const event = parseEvent(buf.slice(0, cut));
            buf = buf.slice(cut + 2);
            if (!event) continue;
            if (event.id !== null) lastId = event.id;
            if (onEvent(event.type, event.data)) {
              reader.cancel().catch(() => {});
              return;
            }
          }
        }
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof ApiError && err.status >= 400 && err.status < 500) throw err;
        if (++failures > 5) throw err;
      }
      if (signal.aborted) return;
      await sleep(Math.min(1000 * 2 ** failures, 10000));
    }
  }

  function parseEvent(block) {
    let type = "message", id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    if (!data.length) return null;
    try {
      return { type, id, data: JSON.parse(data.join("\n")) };
    } catch (e) {
      return null;
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // -- the API key dialog ------------------------------------------------------------------------

  let keyWaiter = null;

  // Opens the dialog (once for any number of waiting requests); resolves true when a key was saved.
  function askForKey(reason) {
    if (keyWaiter) return keyWaiter.promise;
    let resolve;
    const promise = new Promise((r) => { resolve = r; });
    keyWaiter = { promise, resolve, fromRequest: true };
    $("key-reason").textContent = reason;
    $("key-input").value = currentKey();
    $("key-input").removeAttribute("aria-invalid");
    const dialog = $("key-dialog");
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
    return promise;
  }

  function closeKeyDialog(saved) {
    const waiter = keyWaiter;
    keyWaiter = null;
    if ($("key-dialog").open) $("key-dialog").close();
    if (waiter) waiter.resolve(saved);
  }

  function wireKeyDialog() {
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) {
        $("key-input").setAttribute("aria-invalid", "true");
        $("key-reason").textContent = "Enter a key, or choose Cancel.";
        $("key-input").focus();
        return;
      }
      const changed = key !== currentKey();
      setKey(key);
      for (const url of state.media.values()) URL.revokeObjectURL(url);
      state.media.clear();
      const fromRequest = !keyWaiter || keyWaiter.fromRequest;
      closeKeyDialog(true);
      // A request that met a 401 retries by itself; a key changed from the header reloads all.
      if (!fromRequest && changed) reload();
    });
    $("key-cancel").addEventListener("click", () => closeKeyDialog(false));
    $("key-dialog").addEventListener("cancel", (e) => {
      e.preventDefault();
      closeKeyDialog(false);
    });
    $("key-forget").addEventListener("click", () => {
      setKey("");
      $("key-input").value = "";
      $("key-reason").textContent = "The key is forgotten in this browser.";
      $("key-input").focus();
    });
    $("key-button").addEventListener("click", () => {
      askForKey(currentKey() ? "Change or forget the API key this page sends."
                             : "Set the API key this page sends (when the server requires one).");
      keyWaiter.fromRequest = false;
    });
  }

  // -- errors ------------------------------------------------------------------------------------

  function showError(err, context) {
    const message = err instanceof Error ? err.message : String(err);
    $("error-text").textContent = context ? `${context}: ${message}` : message;
    $("error").hidden = false;
    $("error").scrollIntoView({ block: "nearest" });
  }

  function hideError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  // -- the form ----------------------------------------------------------------------------------

  const NUMBER_FIELDS = ["width", "height", "num_frames", "fps", "num_inference_steps",
                         "guidance_scale"];

  async function loadModels() {
    const body = await api("/models");
    state.models = Array.isArray(body.data) ? body.data : [];
    const select = $("model");
    select.replaceChildren(...state.models.map((m) => new Option(modelLabel(m), m.id)));
    const keep = state.model && state.models.find((m) => m.id === state.model.id);
    selectModel(keep ? keep.id : state.models.length ? state.models[0].id : null, !keep);
  }

  function modelLabel(model) {
    const tasks = taskList(model);
    return tasks.length ? `${model.id} (${tasks.join(", ")})` : model.id;
  }

  const taskList = (model) => (model && Array.isArray(model.tasks) ? model.tasks : []);

  function selectModel(id, fillDefaults) {
    const model = state.models.find((m) => m.id === id) || null;
    state.model = model;
    if (model) $("model").value = model.id;
    const lim = (model && model.limits) || {};
    setRange("width", lim.min_side_px, lim.max_side_px);
    setRange("height", lim.min_side_px, lim.max_side_px);
    setRange("num_frames", lim.min_num_frames, lim.max_num_frames);
    setRange("fps", 1, lim.max_fps);
    setRange("num_inference_steps", 1, lim.max_steps);
    setRange("guidance_scale", 0, lim.max_guidance_scale);
    if (lim.max_prompt_chars) {
      $("prompt").maxLength = lim.max_prompt_chars;
      $("negative_prompt").maxLength = lim.max_prompt_chars;
    }
    if (lim.max_topk) $("att-topk").dataset.max = lim.max_topk;

    const i2v = taskList(model).includes("i2v");
    $("image-field").hidden = !i2v;
    if (!i2v) clearImage();
    renderModelInfo(model);
    if (fillDefaults) applyDefaults();
    updateHints();
  }

  function setRange(id, min, max) {
    const input = $(id);
    if (min !== undefined && min !== null) input.min = min;
    if (max !== undefined && max !== null) input.max = max;
  }

  function renderModelInfo(model) {
    const info = $("model-info");
    if (!model) {
      info.textContent = "No model listed by the server.";
      return;
    }
    const parts = [];
    if (model.note) parts.push(model.note);
    const tasks = taskList(model);
    if (tasks.length) parts.push(`tasks: ${tasks.join(", ")}`);
    if (Array.isArray(model.workers)) {
      parts.push(model.workers.length ? `${model.workers.length} live worker(s)`
                                      : "no live worker: jobs wait until one starts");
    }
    if (model.attention_defaults) {
      const att = { ...ATTENTION_DEFAULTS, ...model.attention_defaults };
      parts.push(`attention defaults: ${attentionSummary(att)}`);
    }
    info.textContent = parts.join(" · ");
  }

  function applyDefaults() {
    const lim = (state.model && state.model.limits) || {};
    const values = { width: lim.default_width, height: lim.default_height,
                     num_frames: lim.default_num_frames, fps: lim.default_fps,
                     num_inference_steps: lim.default_steps,
                     guidance_scale: lim.default_guidance_scale };
    for (const [id, value] of Object.entries(values)) $(id).value = value ?? "";
    const own = (state.model && state.model.attention_defaults) || {};
    const att = { ...ATTENTION_DEFAULTS, ...own };
    $("att-backend").value = att.backend;
    $("att-select").value = att.select;
    $("att-threshold").value = att.threshold;
    $("att-topk").value = Array.isArray(att.topk) ? att.topk.join(",") : att.topk;
    $("att-dense-steps").value = att.dense_steps;
    syncAttention();
    updateHints();
  }

  function syncAttention() {
    const sparse = $("att-backend").value === "vmoba";
    for (const id of ["att-select", "att-threshold", "att-topk", "att-dense-steps"]) {
      $(id).disabled = !sparse;
    }
    const topk = $("att-select").value === "topk";
    $("topk-field").hidden = !topk;
    $("topk-hint").hidden = !topk;
    $("threshold-field").hidden = topk;
  }

  function updateHints() {
    const lim = (state.model && state.model.limits) || {};
    const w = Number($("width").value), h = Number($("height").value);
    const frames = Number($("num_frames").value), fps = Number($("fps").value);
    const size = [];
    if (lim.min_side_px) size.push(`${lim.min_side_px}–${lim.max_side_px} px, multiples of ${lim.size_multiple || 16}`);
    if (lim.max_pixels) {
      size.push(`width × height ≤ ${lim.max_pixels.toLocaleString("en")}` +
                (w && h ? ` (now ${(w * h).toLocaleString("en")})` : ""));
    }
    $("size-hint").textContent = size.join("; ");
    const length = [];
    if (lim.min_num_frames) {
      length.push(`4k+1 frames, ${lim.min_num_frames}–${lim.max_num_frames}`);
    }
    if (frames && fps) {
      length.push(`${frames} frames at ${fps} fps = ${((frames - 1) / fps).toFixed(2)} s`);
    }
    $("length-hint").textContent = length.join("; ");
    const steps = [];
    if (lim.max_steps) steps.push(`steps 1–${lim.max_steps}`);
    if (lim.max_guidance_scale !== undefined) steps.push(`guidance 0–${lim.max_guidance_scale}`);
    steps.push("seed: empty for a random one (the job shows it)");
    $("steps-hint").textContent = steps.join("; ");
  }

  function clearImage() {
    $("image").value = "";
    $("image-preview").hidden = true;
    $("image-preview").removeAttribute("src");
  }

  function readImage(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error(`could not read ${file.name}`));
      reader.readAsDataURL(file);
    });
  }

  function numberOrText(text) {
    const n = Number(text);
    return text !== "" && Number.isFinite(n) ? n : text;
  }

  async function buildRequest() {
    const body = { prompt: $("prompt").value };
    if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
    if (state.models.length > 1 && state.model) body.model = state.model.id;
    for (const id of NUMBER_FIELDS) {
      const text = $(id).value.trim();
      if (text !== "") body[id] = numberOrText(text);
    }
    const seed = $("seed").value.trim();
    // Seeds go up to 2^63-1; beyond 2^53 a JavaScript number would round it, a string does not.
    if (seed !== "") {
      body.seed = /^\d+$/.test(seed) && !Number.isSafeInteger(Number(seed)) ? seed
                                                                           : numberOrText(seed);
    }
    const attention = { backend: $("att-backend").value };
    if (attention.backend === "vmoba") {
      attention.select = $("att-select").value;
      if (attention.select === "topk") {
        const parts = $("att-topk").value.split(",").map((s) => s.trim()).filter(Boolean);
        attention.topk = parts.length === 1 ? numberOrText(parts[0]) : parts.map(numberOrText);
      } else {
        attention.threshold = numberOrText($("att-threshold").value.trim());
      }
      attention.dense_steps = numberOrText($("att-dense-steps").value.trim());
    }
    body.attention = attention;
    const file = !$("image-field").hidden && $("image").files[0];
    if (file) body.image = await readImage(file);
    return body;
  }

  async function submit(e) {
    e.preventDefault();
    hideError();
    const button = $("submit");
    button.disabled = true;
    try {
      const job = await api("/generate", { method: "POST", json: await buildRequest() });
      showJob(job.id, job, true);
      refreshList();
    } catch (err) {
      showError(err, "Could not submit the job");
    } finally {
      button.disabled = false;
    }
  }

  // -- the shown job -----------------------------------------------------------------------------

  function closeShown() {
    const view = state.shown;
    if (!view) return;
    view.abort.abort();
    clearInterval(view.clock);
    clearInterval(view.poll);
    state.shown = null;
  }

  async function showJob(id, job, reveal = false) {
    closeShown();
    const view = { id, job: job || null, abort: new AbortController(), steps: [], skew: null,
                   clock: null, poll: null, finished: false };
    state.shown = view;
    if (location.hash !== `#${id}`) history.replaceState(null, "", `#${id}`);
    $("job-empty").hidden = true;
    $("job").hidden = false;
    $("result").hidden = true;
    const video = $("video");
    video.removeAttribute("src");
    video.load();
    $("job-id").textContent = id;
    markShown();
    // On one column (a phone) the job panel is below the form: bring it into view.
    if (reveal && window.matchMedia("(max-width: 899px)").matches) {
      $("job").scrollIntoView({ behavior: "smooth", block: "start" });
    }
    if (!view.job) {
      try {
        view.job = await api(`/jobs/${id}`, { signal: view.abort.signal });
      } catch (err) {
        if (!view.abort.signal.aborted) showError(err, `Could not load job ${id}`);
        return;
      }
      if (state.shown !== view) return;
    }
    renderShown(view);
    if (TERMINAL.has(view.job.status)) finish(view);
    else follow(view);
  }

  function follow(view) {
    view.clock = setInterval(() => renderTimes(view), 500);
    // The event stream says when a job starts, not how the queue moves: poll while it waits.
    view.poll = setInterval(async () => {
      if (view.job.status !== "queued") return;
      try {
        const job = await api(`/jobs/${view.id}`, { signal: view.abort.signal });
        if (state.shown === view && job.status === "queued") {
          view.job.queue_position = job.queue_position;
          renderShown(view);
        }
      } catch (e) { /* the stream reports real trouble */ }
    }, 1500);
    streamEvents(view.id, (type, data) => onEvent(view, type, data), view.abort.signal)
      .catch((err) => {
        if (!view.abort.signal.aborted) showError(err, `Lost the event stream of job ${view.id}`);
      });
  }

  function onEvent(view, type, data) {
    if (state.shown !== view) return true;
    if (typeof data.ts === "number") {
      // Our clock minus the server's (the least seen: network delay counts least), so that the
      // elapsed time is measured from started_at on the server's clock.
      const skew = Date.now() / 1000 - data.ts;
      view.skew = view.skew === null ? skew : Math.min(view.skew, skew);
    }
    if (type === "deleted") {
      view.job.status = "cancelled";
      view.job.error = { code: "deleted", message: "the job was deleted" };
    } else if (type === "snapshot" || TERMINAL.has(type)) {
      view.job = data;
    } else {
      for (const k of ["status", "stage", "progress", "step", "total_steps"]) {
        if (data[k] !== undefined) view.job[k] = data[k];
      }
      if (type === "started") {
        view.job.started_at = data.started_at || data.ts || view.job.started_at;
      }
      if (type === "requeued") view.steps = [];
      if (view.job.status !== "queued") view.job.queue_position = null;
      if (type === "progress") view.steps.push([data.step, performance.now()]);
    }
    renderShown(view);
    if (type === "deleted" || TERMINAL.has(view.job.status)) {
      finish(view);
      return true;
    }
    return false;
  }

  function finish(view) {
    if (view.finished) return;
    view.finished = true;
    clearInterval(view.clock);
    clearInterval(view.poll);
    renderShown(view);
    if (view.job.status === "completed") loadResult(view);
    refreshList();
  }

  async function loadResult(view) {
    $("result").hidden = false;
    try {
      const url = await mediaUrl(`/jobs/${view.id}/video`);
      if (state.shown !== view) return;
      $("video").src = url;
      $("download").href = url;
      $("download").download = `${view.id}.mp4`;
    } catch (err) {
      showError(err, `Could not load the video of job ${view.id}`);
    }
  }

  function renderShown(view) {
    const job = view.job;
    const badge = $("job-status");
    badge.textContent = statusWord(job.status);
    badge.className = `badge ${job.status}`;
    const progress = $("progress");
    progress.value = job.progress || 0;
    progress.setAttribute("aria-valuetext", `${job.progress || 0}%`);
    $("progress-text").textContent = progressText(job);
    const cancel = $("cancel");
    cancel.hidden = TERMINAL.has(job.status);
    cancel.disabled = Boolean(job.cancel_requested);
    renderTimes(view);
    renderDetails($("job-details"), job);
  }

  function progressText(job) {
    const steps = job.total_steps ? `step ${job.step}/${job.total_steps}` : "";
    switch (job.status) {
      case "queued":
        return job.queue_position ? `Queued: position ${job.queue_position} in the queue`
                                  : "Queued";
      case "in_progress": {
        const stopping = job.cancel_requested ? " (cancel requested: stops at the next step)" : "";
        if (job.stage === "decoding") return `Decoding the video (${steps} done)${stopping}`;
        if (job.stage === "encoding") return `Encoding the mp4 (${steps} done)${stopping}`;
        const what = steps ? steps[0].toUpperCase() + steps.slice(1) : "Starting";
        return `${what} · ${job.progress}%${stopping}`;
      }
      case "completed":
        return `Completed: ${steps || "done"} · 100%`;
      case "cancelled":
        return `Cancelled${steps ? ` at ${steps}` : ""}`;
      case "failed":
        return `Failed: ${(job.error && job.error.message) || "unknown error"}`;
      default:
        return job.status;
    }
  }

  function renderTimes(view) {
    const job = view.job;
    const now = Date.now() / 1000 - (view.skew || 0);
    const parts = [];
    if (job.status === "queued" && job.created_at) {
      parts.push(`waiting ${duration(now - job.created_at)}`);
    } else if (job.status === "in_progress" && job.started_at) {
      parts.push(`elapsed ${duration(now - job.started_at)}`);
      const left = estimateLeft(view);
      if (left !== null) parts.push(`about ${duration(left)} left`);
    } else if (TERMINAL.has(job.status) && job.timings && job.timings.total_s !== undefined) {
      parts.push(`took ${duration(job.timings.total_s)}`);
    }
    $("progress-times").textContent = parts.join(" · ");
  }

  // Seconds of denoising left, from the pace of the steps seen so far.
  function estimateLeft(view) {
    const job = view.job;
    if (!job.total_steps || job.stage !== "denoising") return null;
    const seen = view.steps;
    let perStep = null;
    if (seen.length >= 2 && seen[seen.length - 1][0] > seen[0][0]) {
      const [s1, t1] = seen[seen.length - 1], [s0, t0] = seen[0];
      perStep = (t1 - t0) / 1000 / (s1 - s0);
    } else if (job.step > 0 && job.started_at) {
      perStep = (Date.now() / 1000 - (view.skew || 0) - job.started_at) / job.step;
    }
    if (perStep === null) return null;
    let left = (job.total_steps - job.step) * perStep;
    if (seen.length) left -= (performance.now() - seen[seen.length - 1][1]) / 1000;
    return Math.max(0, left);
  }

  async function cancelShown() {
    const view = state.shown;
    if (!view) return;
    $("cancel").disabled = true;
    try {
      const job = await api(`/jobs/${view.id}/cancel`, { method: "POST" });
      if (state.shown !== view || view.finished) return;
      view.job = job;
      renderShown(view);
      if (TERMINAL.has(job.status)) finish(view);
    } catch (err) {
      $("cancel").disabled = false;
      showError(err, `Could not cancel job ${view.id}`);
    }
  }

  function clearShown() {
    closeShown();
    history.replaceState(null, "", location.pathname + location.search);
    $("job").hidden = true;
    $("job-empty").hidden = false;
    $("video").removeAttribute("src");
    markShown();
  }

  // -- job details -------------------------------------------------------------------------------

  function statusWord(status) {
    return { queued: "queued", in_progress: "running", completed: "completed",
             failed: "failed", cancelled: "cancelled" }[status] || status;
  }

  function attentionSummary(att) {
    if (!att) return "";
    if (att.backend === "dense") return "dense";
    const select = att.select === "topk"
      ? `topk ${Array.isArray(att.topk) ? att.topk.join(",") : att.topk}`
      : `${att.select} ${att.threshold}`;
    return `vmoba ${select}, dense steps ${att.dense_steps}`;
  }

  function settingsSummary(job) {
    const r = job.request || {};
    return [`${r.width}×${r.height}`, `${r.num_frames} frames @ ${r.fps} fps`,
            `${r.num_inference_steps} steps`, `seed ${job.seed ?? r.seed}`,
            attentionSummary(r.attention)].filter(Boolean).join(" · ");
  }

  function renderDetails(dl, job) {
    const r = job.request || {};
    const rows = [["Prompt", r.prompt]];
    if (r.negative_prompt) rows.push(["Negative prompt", r.negative_prompt]);
    rows.push(["Model", job.model]);
    rows.push(["Size", `${r.width}×${r.height}, ${r.num_frames} frames @ ${r.fps} fps` +
                       (r.fps ? ` (${((r.num_frames - 1) / r.fps).toFixed(2)} s)` : "")]);
    rows.push(["Steps", `${r.num_inference_steps}, guidance ${r.guidance_scale}`]);
    rows.push(["Seed", String(job.seed ?? r.seed ?? "")]);
    rows.push(["Attention", attentionSummary(r.attention)]);
    if (r.image) rows.push(["Start image", "yes"]);
    rows.push(["Density", typeof job.density === "number" ? job.density.toFixed(3) : "—"]);
    const order = ["queued_s", "text_encoder_s", "denoising_s", "decoding_s", "encoding_s",
                   "total_s"];
    const rank = (k) => (order.includes(k) ? order.indexOf(k) : order.length - 1);
    const timings = Object.entries(job.timings || {})
      .filter(([, v]) => typeof v === "number")
      .sort(([a], [b]) => rank(a) - rank(b))
      .map(([k, v]) => `${k.replace(/_s$/, "").replace(/_/g, " ")} ${duration(v)}`);
    rows.push(["Timings", timings.join(" · ") || "—"]);
    if (job.worker) rows.push(["Worker", job.worker]);
    if (job.error) rows.push(["Error", `${job.error.code}: ${job.error.message}`]);
    dl.replaceChildren(...rows.flatMap(([term, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.field = term.toLowerCase().replace(/ /g, "-");
      return [dt, dd];
    }));
  }

  function clock(epochSeconds) {
    if (!epochSeconds) return "";
    const when = new Date(epochSeconds * 1000);
    const time = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return when.toDateString() === new Date().toDateString()
      ? time : `${when.toLocaleDateString()} ${time}`;
  }

  function duration(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) seconds = 0;
    if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
    const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
    return `${m} min ${s} s`;
  }

  // -- recent jobs -------------------------------------------------------------------------------

  async function refreshList() {
    if (state.listing) {
      state.listAgain = true;
      return state.listing;
    }
    state.listing = (async () => {
      try {
        const page = await api(`/jobs?limit=${LIST_LIMIT}`);
        state.jobs = Array.isArray(page.data) ? page.data : [];
        renderList();
      } catch (err) {
        showError(err, "Could not list the jobs");
      }
    })();
    await state.listing;
    state.listing = null;
    if (state.listAgain) {
      state.listAgain = false;
      await refreshList();
    }
  }

  function renderList() {
    const ul = $("jobs");
    const old = new Map([...ul.children].map((li) => [li.dataset.id, li]));
    const items = state.jobs.map((job) => {
      const sig = [job.status, job.progress, job.stage].join("|");
      const li = old.get(job.id);
      if (li && li.dataset.sig === sig) return li;
      if (state.compare.includes(job.id) && li) setTimeout(renderCompare);
      return jobItem(job, sig);
    });
    items.forEach((li, i) => {
      if (ul.children[i] !== li) ul.insertBefore(li, ul.children[i] || null);
    });
    while (ul.children.length > items.length) ul.lastElementChild.remove();
    $("jobs-empty").hidden = items.length > 0;
    markShown();
  }

  function jobItem(job, sig) {
    const li = el("li", { "data-id": job.id, "data-sig": sig, "data-status": job.status });
    const prompt = (job.request && job.request.prompt) || "";
    const img = el("img", { class: "thumb", alt: "", width: 64, height: 48 });
    if (job.status === "completed") {
      mediaUrl(`/jobs/${job.id}/thumbnail`).then((url) => { img.src = url; }).catch(() => {});
    }
    const open = el("button", { type: "button", class: "job-open", title: `Show job ${job.id}` },
      img,
      el("span", { class: "job-text" },
        el("span", {},
          el("span", { class: `badge ${job.status}` }, statusWord(job.status) +
             (job.status === "in_progress" ? ` ${job.progress}%` : "")),
          el("span", { class: "when" }, clock(job.created_at))),
        el("span", { class: "prompt" }, prompt),
        el("span", { class: "settings" }, settingsSummary(job))));
    open.addEventListener("click", () => showJob(job.id, null, true));

    const boxId = `compare-${job.id}`;
    const box = el("input", { type: "checkbox", id: boxId, class: "compare-box" });
    box.checked = state.compare.includes(job.id);
    box.addEventListener("change", () => toggleCompare(job.id, box.checked));
    const del = el("button", { type: "button", class: "danger delete",
                               "aria-label": `Delete job: ${prompt.slice(0, 60)}` }, "Delete");
    del.addEventListener("click", () => deleteJob(job.id, del, prompt));
    li.append(open, el("div", { class: "job-tools" },
      el("label", { for: boxId }, box, "compare"), del));
    return li;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    node.append(...children);
    return node;
  }

  function markShown() {
    const id = state.shown && state.shown.id;
    for (const li of $("jobs").children) {
      li.classList.toggle("shown", li.dataset.id === id);
      const open = li.querySelector(".job-open");
      if (open) {
        if (li.dataset.id === id) open.setAttribute("aria-current", "true");
        else open.removeAttribute("aria-current");
      }
    }
  }

  // Two clicks: the first arms the button for a few seconds, the second deletes.
  async function deleteJob(id, button, prompt) {
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.textContent = "Confirm delete";
      button.setAttribute("aria-label", `Confirm: delete job ${prompt.slice(0, 60)}`);
      setTimeout(() => {
        if (!button.isConnected) return;
        button.dataset.armed = "";
        button.textContent = "Delete";
        button.setAttribute("aria-label", `Delete job: ${prompt.slice(0, 60)}`);
      }, 5000);
      return;
    }
    button.disabled = true;
    try {
      await api(`/jobs/${id}`, { method: "DELETE" });
      forgetMedia(id);
      state.jobs = state.jobs.filter((j) => j.id !== id);
      if (state.compare.includes(id)) toggleCompare(id, false);
      if (state.shown && state.shown.id === id) clearShown();
      renderList();
    } catch (err) {
      button.disabled = false;
      showError(err, "Could not delete the job");
    }
    refreshList();
  }

  // -- compare -----------------------------------------------------------------------------------

  function toggleCompare(id, on) {
    state.compare = state.compare.filter((x) => x !== id);
    if (on) state.compare.push(id);
    while (state.compare.length > 2) state.compare.shift();
    for (const box of document.querySelectorAll(".compare-box")) {
      box.checked = state.compare.includes(box.id.slice("compare-".length));
    }
    renderCompare();
  }

  let compareToken = 0;
  async function renderCompare() {
    const token = ++compareToken;
    const panel = $("compare"), grid = $("compare-grid");
    if (state.compare.length < 2) {
      panel.hidden = true;
      grid.replaceChildren();
      return;
    }
    let jobs;
    try {
      jobs = await Promise.all(state.compare.map((id) => api(`/jobs/${id}`)));
    } catch (err) {
      showError(err, "Could not load the jobs to compare");
      return;
    }
    if (token !== compareToken) return;
    const figures = await Promise.all(jobs.map(compareFigure));
    if (token !== compareToken) return;
    grid.replaceChildren(...figures);
    panel.hidden = false;
    restartCompared();
  }

  // Both compared videos from their first frame, together (autoplay does not start videos made
  // outside the document).
  function restartCompared() {
    for (const video of $("compare-grid").querySelectorAll("video")) {
      video.currentTime = 0;
      video.play().catch(() => { /* the controls still play it */ });
    }
  }

  async function compareFigure(job) {
    const prompt = (job.request && job.request.prompt) || job.id;
    const figure = el("figure", { "data-id": job.id },
      el("figcaption", {}, `${statusWord(job.status)}: ${prompt}`));
    if (job.status === "completed") {
      const video = el("video", { controls: "", loop: "", muted: "", autoplay: "", playsinline: "",
                                  "aria-label": `video of the job: ${prompt.slice(0, 60)}` });
      video.muted = true;
      try {
        video.src = await mediaUrl(`/jobs/${job.id}/video`);
      } catch (err) {
        showError(err, `Could not load the video of job ${job.id}`);
      }
      figure.append(video);
    } else {
      figure.append(el("p", { class: "hint" }, progressText(job)));
    }
    const dl = el("dl", { class: "details" });
    renderDetails(dl, job);
    figure.append(dl);
    return figure;
  }

  // -- start -------------------------------------------------------------------------------------

  async function reload() {
    hideError();
    try {
      await loadModels();
    } catch (err) {
      showError(err, "Could not read the models (GET /models)");
    }
    await refreshList();
    if (state.shown) showJob(state.shown.id);
    renderCompare();
  }

  function init() {
    wireKeyDialog();
    $("generate-form").addEventListener("submit", submit);
    $("model").addEventListener("change", () => selectModel($("model").value, true));
    $("reset-defaults").addEventListener("click", applyDefaults);
    $("att-backend").addEventListener("change", syncAttention);
    $("att-select").addEventListener("change", syncAttention);
    for (const id of ["width", "height", "num_frames", "fps"]) {
      $(id).addEventListener("input", updateHints);
    }
    $("image").addEventListener("change", () => {
      const file = $("image").files[0];
      const preview = $("image-preview");
      if (!file) { clearImage(); return; }
      if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
      preview.src = URL.createObjectURL(file);
      preview.hidden = false;
    });
    $("cancel").addEventListener("click", cancelShown);
    $("refresh").addEventListener("click", refreshList);
    $("error-close").addEventListener("click", hideError);
    $("compare-restart").addEventListener("click", restartCompared);
    $("compare-close").addEventListener("click", () => {
      state.compare = [];
      toggleCompare(null, false);
    });
    // Refresh the list often while a listed job is moving, now and then otherwise (other
    // clients' jobs).
    let ticks = 0;
    setInterval(() => {
      ticks += 1;
      if (document.hidden || keyWaiter) return;
      if (state.jobs.some((j) => !TERMINAL.has(j.status)) || ticks % 5 === 0) refreshList();
    }, LIST_REFRESH_MS);

    reload().then(() => {
      const id = location.hash.slice(1);
      if (JOB_ID.test(id) && !state.shown) showJob(id);
    });
  }

  init();
})();
