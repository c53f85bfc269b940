"""What a worker does to its pipelines once they are loaded, to make a generation faster.

- Compiled transformer blocks (`COMPILE`, default on CUDA): `vmoba.diffusers.compile_blocks`
  on every transformer (the repeated block compiled once; VMoBA's op inside it, so no request
  recompiles). The compilation itself happens in the worker's warm-up generation, before the
  worker says it is ready. Inductor and Triton keep their caches in `TORCHINDUCTOR_CACHE_DIR`
  and `TRITON_CACHE_DIR` (the image puts both on the model volume), so a restarted worker
  compiles from cache.
- The VAE decode in bf16 (`VAE_DTYPE`, default bf16 on CUDA): 1.56x faster than fp32 with 4.6 GiB
  less peak memory at 480p on an H100, the frames within 46.5 dB PSNR of fp32's
  (`bench/generation.py --vae`, `bench/results/generation-h100.json`). diffusers' tiled decode
  was slower and moved the frames more (34 dB): not used.

Pipelines of one model share their modules, so each is changed once.
"""

from __future__ import annotations

import logging

import torch

from .pipeline import resolve_dtype

log = logging.getLogger("worker.speedups")


def compile_enabled(setting, device: str) -> bool:
    """`COMPILE`: `None` (unset) means on for CUDA workers, off on the CPU."""
    return torch.device(device).type == "cuda" if setting is None else bool(setting)


def vae_dtype(setting: str, device: str) -> torch.dtype:
    """`VAE_DTYPE`: `auto` is bf16 on CUDA, fp32 on the CPU."""
    return resolve_dtype(None if setting == "auto" else setting, device)


def _unique(pipes: dict, part: str) -> list:
    seen: dict[int, torch.nn.Module] = {}
    for pipe in pipes.values():
        for name in (part, f"{part}_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                seen.setdefault(id(module), module)
    return list(seen.values())


def apply_speedups(
    pipes: dict, *, device: str, compile, vae: str, compile_options: dict | None = None
) -> dict:
    """Compile the transformers' blocks (`compile_options` go to `torch.compile`) and set the
    VAE's dtype on `{task: pipeline}`; returns what was done (for the logs and sidecars)."""
    from vmoba.diffusers.compile import compile_blocks

    done: dict = {"compile": compile_enabled(compile, device), "vae_dtype": None}
    if done["compile"]:
        for transformer in _unique(pipes, "transformer"):
            compile_blocks(transformer, **(compile_options or {}))
    dtype = vae_dtype(vae, device)
    for module in _unique(pipes, "vae"):
        module.to(dtype)
    done["vae_dtype"] = str(dtype).replace("torch.", "")
    log.info("speed-ups: %s", done)
    return done
