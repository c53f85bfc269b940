"""What the self-attention calls of one `use()` block did: accumulated on the device, read once.

`Stats` adds up, per layer kind, the attended tokens (a device scalar, no host sync), the pairs and
the FLOPs; `summary` reads the device counters once and returns a JSON-ready dict. `Timer` marks
the attention op with CUDA events (or wall time on the CPU).
"""

from __future__ import annotations

import threading
import time

import torch

from ..config import LAYER_KINDS, AttentionSettings
from ..flops import full_attention_flops, vmoba_attention_flops


class Stats:
    """What the self-attention calls of one `use()` block did (device scalars until `summary`)."""

    def __init__(self):
        self._lock = threading.Lock()  # only the handle's default state is shared by threads
        self.kinds = {}  # kind -> [calls, attended (device scalar or None), pairs, full, gate]
        self.dense_calls = 0
        self.dense_flops = 0.0
        self.steps = {}  # step index -> True if that step's calls were sparse
        self.timings = []  # (label, start, end): CUDA events, or perf_counter floats

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

    def add_timing(self, label, start, end):
        with self._lock:
            self.timings.append((label, start, end))

    def summary(self, settings: AttentionSettings) -> dict:
        """Read the device counters (one sync) and return a JSON-ready dict."""
        with self._lock:
            kinds = {k: list(v) for k, v in self.kinds.items()}
            timings = list(self.timings)
            dense_calls, dense_flops, steps = self.dense_calls, self.dense_flops, dict(self.steps)
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
        return out


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

    _start: torch.cuda.Event | float  # set by start(): an event on CUDA, perf_counter() on the CPU

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

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
