"""Worker groups: one job on `GPUS_PER_JOB = N` GPUs (Ulysses context parallelism).

The launcher starts the `N` ranks of a group as `python -m worker.run` processes, one per GPU,
each seeing the group's GPUs and using GPU `rank` (`GROUP_RANK`, `GROUP_PORT`). They join one
`torch.distributed` process group (NCCL on GPUs, gloo on the CPU) through a TCP store that rank
0 serves on localhost, load the same model and split every transformer call over the group
(`vmoba.diffusers.parallel.enable_ulysses`).

- Rank 0 is the RQ worker: it takes jobs, writes the records, heartbeats and results, exactly
  as a one-GPU worker does. Each pipeline call it makes (the warm-up, every job) is first
  published in the store (`share`); the other ranks (followers, `worker.run.run_follower`) wait for the
  next call and make the same one, without decoding the video (rank 0 does).
- After every denoising step rank 0 runs its checks (progress, cancel, timeout, shutdown) and
  publishes `go` or `stop` for that step; every follower waits for that word before its next
  step, so all ranks leave the pipeline at the same step (`GroupStop` on the followers).
- A rank 0 call that fails anywhere else (an error inside a step, before the last step's word)
  leaves followers inside a collective: rank 0 then finishes the job by the usual rules and
  exits for a restart, and the launcher restarts the whole group.
- Followers write a heartbeat file (`GROUP_BEAT_FILE`) that the launcher watches; any rank
  that exits or stops beating gets the whole group torn down and restarted, and the job that
  rank 0 held follows the worker-lost rules (the janitor).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

from contract.speed import Shape

if TYPE_CHECKING:
    from .settings import WorkerSettings

log = logging.getLogger("worker.group")

# How often a follower looks for the next call or step word in the store (seconds).
POLL_S = 0.02
# Calls whose keys rank 0 keeps in the store: older ones every follower has read.
KEEP_CALLS = 2


class GroupStop(Exception):
    """Rank 0 stopped the call at this step (a cancel, a timeout, a shutdown, an error)."""


@dataclass
class Group:
    """This process's place in its worker group and the store the ranks talk through."""

    rank: int
    size: int
    store: Any  # torch.distributed.Store
    seq: int = 0  # calls shared (rank 0) or taken (followers) so far
    step_words_done: bool = True  # rank 0: the current call's last step word is out
    stop_exc: Optional[BaseException] = None  # rank 0: what its step hook raised (and shared)
    _keys: list = field(default_factory=list)  # rank 0: store keys per call, oldest first

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- joining ----------------------------------------------------------------------------
    @classmethod
    def join(cls, settings: WorkerSettings, device: str) -> Optional[Group]:
        """Join the process group of `GPUS_PER_JOB` ranks (None when it is 1): rank 0 serves
        the store on `127.0.0.1:GROUP_PORT`, every rank waits for the others (up to
        `GROUP_TIMEOUT_S`)."""
        size = settings.GPUS_PER_JOB
        if size == 1:
            return None
        import torch
        import torch.distributed as dist

        rank = settings.GROUP_RANK
        if not 0 <= rank < size:
            raise SystemExit(f"GROUP_RANK={rank} is not a rank of a group of {size}")
        timeout = timedelta(seconds=settings.GROUP_TIMEOUT_S)
        if device.startswith("cuda"):
            torch.cuda.set_device(rank)
        store = dist.TCPStore(
            "127.0.0.1", settings.GROUP_PORT, size, is_master=rank == 0, timeout=timeout
        )
        dist.init_process_group(
            "nccl" if device.startswith("cuda") else "gloo",
            store=dist.PrefixStore("process_group/", store),
            rank=rank,
            world_size=size,
            timeout=timeout,
        )
        log.info("rank %d of %d joined its worker group (%s)", rank, size, device)
        return cls(rank, size, dist.PrefixStore("worker/", store))

    def device(self, device: str) -> str:
        """This rank's device: `cuda:<rank>` on GPUs (the group's GPUs are all visible)."""
        return f"cuda:{self.rank}" if device.startswith("cuda") else device

    def parallelize(self, transformers) -> None:
        """Split the transformers' calls over the group (`SystemExit` with `EXIT_CONFIG` when
        the group size does not divide their head count: no restart can fix that)."""
        from contract.supervise import EXIT_CONFIG
        from vmoba.diffusers.parallel import enable_ulysses

        try:
            enable_ulysses(transformers)
        except ValueError as exc:
            log.error("GPUS_PER_JOB=%d refused: %s", self.size, exc)
            raise SystemExit(EXIT_CONFIG) from exc

    # -- rank 0 ----------------------------------------------------------------------------
    def share(self, call: dict) -> None:
        """Publish the next pipeline call for the followers."""
        assert self.leader
        self.seq += 1
        self._keys.append([])
        self._set(f"call/{self.seq}", json.dumps(call))
        self.stop_exc = None
        self.step_words_done = False
        while len(self._keys) > KEEP_CALLS:
            for key in self._keys.pop(0):
                self.store.delete_key(key)

    def leading(self, on_step: Optional[Callable[[int, int], None]]):
        """Rank 0's step hook: `on_step`, then `go` or `stop` (when it raised) for this step."""

        def hook(done: int, total: int) -> None:
            try:
                if on_step is not None:
                    on_step(done, total)
            except BaseException as exc:
                self.stop_exc = exc
                self._set(f"step/{self.seq}/{done}", "stop")
                self.step_words_done = True
                raise
            self._set(f"step/{self.seq}/{done}", "go")
            self.step_words_done = done >= total

        return hook

    def in_step(self, exc: BaseException) -> bool:
        """Whether the followers left the call as rank 0 did when `exc` ended it: it was the
        stop rank 0 shared, or it came after the last step's word."""
        return exc is self.stop_exc or self.step_words_done

    def close(self) -> None:
        """Leave the group at a clean shutdown; rank 0 first tells the followers to exit."""
        import torch.distributed as dist

        if self.leader:
            self.seq += 1
            self._keys.append([])
            self._set(f"call/{self.seq}", json.dumps({"exit": True}))
        if dist.is_initialized():
            dist.destroy_process_group()

    def _set(self, key: str, value: str) -> None:
        self.store.set(key, value)
        self._keys[-1].append(key)

    # -- followers -------------------------------------------------------------------------
    def next_call(self) -> Optional[dict]:
        """Wait for rank 0's next call (None: exit)."""
        self.seq += 1
        call = json.loads(self._wait(f"call/{self.seq}"))
        return None if call.get("exit") else call

    def following(self, done: int, total: int) -> None:
        """A follower's step hook: wait for rank 0's word on this step."""
        if self._wait(f"step/{self.seq}/{done}") == "stop":
            raise GroupStop(f"rank 0 stopped the call at step {done} of {total}")

    def _wait(self, key: str) -> str:
        # A polled check rather than a blocking wait: it releases the GIL between looks (the
        # heartbeat thread keeps beating) and fails at once when rank 0's store is gone.
        while not self.store.check([key]):
            time.sleep(POLL_S)
        value = self.store.get(key)
        return value.decode() if isinstance(value, bytes) else str(value)


# -- the calls rank 0 shares -----------------------------------------------------------------
def encode_call(
    model_id: str,
    task: str,
    shape: Shape,
    *,
    prompt: str,
    negative_prompt: str,
    seed: int,
    flow_shift: float,
    attention,
    image=None,
) -> dict:
    """`Runtime.generate`'s arguments as JSON (the image as PNG)."""
    png = None
    if image is not None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        png = base64.b64encode(buf.getvalue()).decode()
    return {
        "model_id": model_id,
        "task": task,
        "shape": asdict(shape),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": int(seed),
        "flow_shift": float(flow_shift),
        "attention": attention.to_dict(),
        "image_png": png,
    }


def decode_call(call: dict) -> dict:
    """`encode_call`'s JSON -> keyword arguments of `Runtime.generate`."""
    from vmoba.config import AttentionSettings

    image = None
    if call["image_png"] is not None:
        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(call["image_png"]))).convert("RGB")
    return {
        "model_id": call["model_id"],
        "task": call["task"],
        "shape": Shape(**call["shape"]),
        "prompt": call["prompt"],
        "negative_prompt": call["negative_prompt"],
        "seed": call["seed"],
        "flow_shift": call["flow_shift"],
        "attention": AttentionSettings.from_dict(call["attention"]),
        "image": image,
    }


def group_env(rank: int, size: int, port: int, beat_file: str) -> dict:
    """The environment the launcher gives rank `rank` of a group (see `WorkerSettings`)."""
    return {
        "GPUS_PER_JOB": str(size),
        "GROUP_RANK": str(rank),
        "GROUP_PORT": str(port),
        "GROUP_BEAT_FILE": beat_file,
        # NVLink SHARP (multicast) stays off: the GPU hosts this runs on do not all offer it
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0"),
    }
