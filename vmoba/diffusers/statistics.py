"""What the self-attention calls of one `use()` block did: accumulated on the device, read once.

`Stats` adds up, per layer kind, the attended tokens (a device scalar, no host sync), the pairs and
the FLOPs, and with `collect_drift` the drift sums (`vmoba.drift`) per layer kind and denoising
step (device tensors); `summary` reads the device counters at the end and returns a JSON-ready
dict. `Timer` marks the attention op with CUDA events (or wall time on the CPU).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import torch

from ..config import LAYER_KINDS, AttentionSettings
from ..drift import DEFAULT_ROWS, Drift
from ..flops import full_attention_flops, vmoba_attention_flops


class Stats:
    """What the self-attention calls of one `use()` block did (device scalars until `summary`)."""

    def __init__(self):
        self._lock = threading.Lock()  # only the handle's default state is shared by threads
        self.kinds = {}  # kind -> [calls, attended (device scalar or None), pairs, full, gate]
        self.dense_calls = 0
        self.dense_flops = 0.0
        self.steps = {}  # step index -> True if that step's calls were sparse
        self.timings: list = []  # (label, start, end): CUDA events, or perf_counter floats
        # (step, kind) -> [drift sums (device [3] fp64: err2, ref2, mass), row vectors, calls]
        self.drift: dict[tuple, list] = {}
        self.drift_query_rows = 0  # query rows sampled per call (min(DEFAULT_ROWS, S))
        # Set by context-parallel calls: their device counters (attended tokens, drift sums)
        # cover this rank's heads only and are summed over this process group at the end.
        self.group: Any = None

    def step(self, step, sparse: bool):
        if step is not None:
            with self._lock:
                self.steps[step] = sparse

    def add_dense(self, batch: int, tokens: int, d_model: int):
        with self._lock:
            self.dense_calls += 1
            self.dense_flops += batch * full_attention_flops(tokens, d_model)

    def add_sparse(self, kind, batch, heads, tokens, d_model, blocks, attended):
        """`attended`: device scalar `sum_{b,h,i} |K|` of the call, or `None` when not counted."""
        full = batch * full_attention_flops(tokens, d_model)
        gate = batch * vmoba_attention_flops(tokens, d_model, blocks, 0.0)
        with self._lock:
            entry = self.kinds.setdefault(kind, [0, 0, 0, 0.0, 0.0])
            entry[0] += 1
            if attended is None or entry[1] is None:
                entry[1] = None
            else:
                entry[1] = attended if isinstance(entry[1], int) else entry[1] + attended
            entry[2] += batch * heads * tokens * tokens
            entry[3] += full
            entry[4] += gate

    def add_drift(
        self, kind: str, step: Optional[int], sums: torch.Tensor, rows: int, query_rows: int
    ):
        """`sums`: `vmoba.drift.drift_sums` of one sparse call (a device tensor, not read here),
        over `rows` row vectors (`B * H * query_rows`)."""
        with self._lock:
            self.drift_query_rows = max(self.drift_query_rows, query_rows)
            entry = self.drift.get((step, kind))
            if entry is None:
                self.drift[(step, kind)] = [sums, rows, 1]
            else:
                entry[0] = entry[0] + sums
                entry[1] += rows
                entry[2] += 1

    def add_timing(self, label, start, end):
        with self._lock:
            self.timings.append((label, start, end))

    def summary(self, settings: AttentionSettings) -> dict:
        """Read the device counters (one sync) and return a JSON-ready dict."""
        with self._lock:
            kinds = {k: list(v) for k, v in self.kinds.items()}
            timings = list(self.timings)
            dense_calls, dense_flops, steps = self.dense_calls, self.dense_flops, dict(self.steps)
            drift = {key: list(v) for key, v in self.drift.items()}
            query_rows = self.drift_query_rows
        if self.group is not None:
            sum_over_ranks(kinds, drift, self.group)
        by_kind, attended_all, pairs_all, sparse_flops, full_sparse = {}, 0.0, 0, 0.0, 0.0
        counted = True
        for kind in LAYER_KINDS:
            if kind not in kinds:
                continue
            calls, attended, pairs, full, gate = kinds[kind]
            full_sparse += full
            if attended is None:
                counted = False
                continue
            attended = float(attended)  # the one device read of the call
            rho = attended / pairs
            by_kind[kind] = rho
            attended_all += attended
            pairs_all += pairs
            # summing rho_call * full_call over the calls of a kind gives rho_kind * full_kind
            sparse_flops += gate + rho * full
        sparse_calls = sum(v[0] for v in kinds.values())
        density = (attended_all / pairs_all) if (counted and pairs_all) else None
        total_dense = dense_flops + full_sparse
        actual = dense_flops + sparse_flops if counted else None
        out = {
            "attention": settings.backend,
            "select": settings.select,
            "steps": len(steps),
            "dense_steps": sum(1 for s in steps.values() if not s),
            "layer_calls": {"dense": dense_calls, "sparse": sparse_calls},
            "density": density,
            "density_by_kind": by_kind if counted else None,
            "attention_flops_dense": total_dense,
            "attention_flops": actual,
            "attention_flops_saved": (total_dense - actual) if actual is not None else None,
            "attention_flops_ratio": (total_dense / actual) if actual else None,
        }
        if settings.collect_timing:
            out.update(timing_summary(timings))
        if settings.collect_drift:
            out["drift"] = drift_summary(drift, query_rows)
        return out


def sum_over_ranks(kinds: dict, drift: dict, group) -> None:
    """Replace each rank's device counters in `kinds` (attended tokens) and `drift` (sums) by
    their sums over the ranks of `group`, in one all-reduce. Every rank of the group must call
    it (the same calls ran on each, so the keys agree)."""
    import torch.distributed as dist

    slots = [(kinds, kind, 1) for kind in sorted(kinds) if kinds[kind][1] is not None]
    slots += [(drift, key, 0) for key in sorted(drift, key=repr)]
    if not slots:
        return
    parts = [torch.as_tensor(table[key][i]).double().reshape(-1) for table, key, i in slots]
    flat = torch.cat(parts)
    dist.all_reduce(flat, group=group)
    for (table, key, i), chunk in zip(slots, flat.split([p.numel() for p in parts])):
        table[key][i] = chunk.reshape(torch.as_tensor(table[key][i]).shape)


def drift_summary(drift: dict, query_rows: int) -> dict:
    """`{(step, kind): [sums, rows, calls]}` -> the JSON-ready `drift` statistics (one read).

    - `rel_l2`, `mass_kept`: over every sparse call (`None` when there was none);
    - `by_kind`: per layer kind, over the steps; `by_step`: per denoising step (`step` is `null`
      when the step was unknown), over the kinds, with its own `by_kind`;
    - each entry: `rel_l2`, `mass_kept`, `calls` (sparse calls) and `rows` (row vectors:
      `B * H` per sampled query row per call); `rows_per_call`: query rows sampled per call.
    Dense calls (the dense steps, `backend="dense"`) are not measured: their drift is 0.
    """
    keys = list(drift)
    # one device-to-host copy for every (step, kind) entry
    host = torch.stack([drift[key][0].double() for key in keys]).cpu().tolist() if keys else []
    totals: dict[Any, list] = {}

    def add(group, sums, rows, calls):
        acc = totals.setdefault(group, [[0.0, 0.0, 0.0], 0, 0])
        acc[0] = [a + x for a, x in zip(acc[0], sums)]
        acc[1] += rows
        acc[2] += calls

    for (step, kind), sums in zip(keys, host):
        _, rows, calls = drift[(step, kind)]
        for group in ("all", ("kind", kind), ("step", step), ("step_kind", step, kind)):
            add(group, sums, rows, calls)

    def entry(group) -> dict:
        sums, rows, calls = totals[group]
        d = Drift.from_sums(sums, rows)
        return {"rel_l2": d.rel_l2, "mass_kept": d.mass_kept, "calls": calls, "rows": rows}

    kinds = [k for k in LAYER_KINDS if ("kind", k) in totals]
    steps = sorted({step for step, _ in keys}, key=lambda s: (s is None, s or 0))
    empty = {"rel_l2": None, "mass_kept": None, "calls": 0, "rows": 0}
    overall = entry("all") if "all" in totals else empty
    return {
        **overall,
        "rows_per_call": query_rows or DEFAULT_ROWS,
        "by_kind": {k: entry(("kind", k)) for k in kinds},
        "by_step": [
            {
                "step": step,
                **entry(("step", step)),
                "by_kind": {
                    k: entry(("step_kind", step, k))
                    for k in kinds
                    if ("step_kind", step, k) in totals
                },
            }
            for step in steps
        ],
    }


def timing_summary(timings) -> dict:
    if any(isinstance(start, torch.cuda.Event) for _, start, _ in timings):
        torch.cuda.synchronize()
    by_label: dict[str, float] = {}
    for label, start, end in timings:
        ms = start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else (end - start) * 1e3
        by_label[label] = by_label.get(label, 0.0) + ms
    return {"attention_ms": sum(by_label.values()), "attention_ms_by_kind": by_label}


class Timer:
    """Start/stop marks: CUDA events on the current stream, or wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        # set by start(): an event on CUDA, perf_counter() on the CPU
        self._start: Any = None

    def start(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return self._start, end
        return self._start, time.perf_counter()
