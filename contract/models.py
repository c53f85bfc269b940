"""The model registry: every model the service knows, as data (docs/models.md renders it).

One `ModelSpec` per servable model: its diffusers pipeline class and hub id, tasks, native
resolutions and frame rule, sampling defaults and whether its weights were trained with VMoBA
(which decides its attention defaults, see `vmoba.defaults`). Each family has a tiny random-weight
twin built in code (`tiny-<family>`, no download) for tests and GPU-less machines, and full-size
random-weight twins (`<id>-random`) for benchmarks on machines that cannot download weights.

```python
spec = get_model("wan2.1-t2v-1.3b")
spec.grid(81, 480, 832)          # (21, 30, 52): the latent video grid VMoBA partitions
spec.defaults.num_frames         # 81
```

Torch-free: the API validates requests against these specs; the worker builds pipelines from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional

Task = Literal["t2v", "i2v"]
TASKS: tuple[Task, ...] = ("t2v", "i2v")

# Wan's negative prompt (the model cards', in English): what the sampler steers away from.
WAN_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, artwork, painting, "
    "still image, overall gray, worst quality, low quality, JPEG artifacts, ugly, deformed, "
    "extra fingers, poorly drawn hands, poorly drawn face, malformed limbs, fused fingers, "
    "motionless frame, cluttered background, three legs, crowded background, walking backwards"
)


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that omits a field gets."""

    num_frames: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    fps: int
    flow_shift_480p: float  # UniPC shift below 720p (by pixel count)
    flow_shift_720p: float  # from 720p up
    negative_prompt: str = ""

    def flow_shift(self, width: int, height: int) -> float:
        return self.flow_shift_720p if width * height >= 1280 * 720 else self.flow_shift_480p


@dataclass(frozen=True)
class ModelSpec:
    """A servable model. `pipeline` names the diffusers class; `hub_id` where its weights live
    (None for models built in code); `vae_scale` is `(temporal, spatial)` compression and
    `patch` the transformer's `(t, h, w)` patch, which give the latent grid."""

    id: str
    family: str
    pipeline: str
    tasks: tuple[Task, ...]
    resolutions: tuple[tuple[int, int], ...]  # native (width, height)
    defaults: SamplingDefaults
    hub_id: Optional[str] = None
    vae_scale: tuple[int, int] = (4, 8)
    patch: tuple[int, int, int] = (1, 2, 2)
    # Two transformers switched at this fraction of the timesteps (Wan 2.2 A14B), else None.
    boundary_ratio: Optional[float] = None
    vmoba_trained: bool = False
    # "tiny": built in code at toy size; "random": full-size architecture with random weights.
    weights: Literal["hub", "tiny", "random"] = "hub"
    # Limits of this model on top of the service's (a tiny CPU model should not take 129 frames
    # at 720p).
    max_num_frames: int = 129
    max_pixels: int = 1280 * 720
    note: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (VAE compression times patch)."""
        return self.vae_scale[1] * self.patch[1]

    def frames_ok(self, num_frames: int) -> bool:
        """Wan's frame rule: `4k+1` (the VAE compresses time by 4 after the first frame)."""
        return num_frames >= 1 and (num_frames - 1) % self.vae_scale[0] == 0

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The latent video grid `(T, Hg, Wg)` of a request (what VMoBA cuts into blocks)."""
        t = (num_frames - 1) // self.vae_scale[0] + 1
        s = self.size_multiple
        return t // self.patch[0], height // s, width // s

    @property
    def is_builtin(self) -> bool:
        return self.weights != "hub"

    def public(self) -> dict:
        """JSON for `GET /models`."""
        d = self.defaults
        return {
            "id": self.id,
            "family": self.family,
            "pipeline": self.pipeline,
            "hub_id": self.hub_id,
            "tasks": list(self.tasks),
            "resolutions": [f"{w}x{h}" for w, h in self.resolutions],
            "frame_rule": f"{self.vae_scale[0]}k+1",
            "size_multiple": self.size_multiple,
            "weights": self.weights,
            "vmoba_trained": self.vmoba_trained,
            "boundary_ratio": self.boundary_ratio,
            "defaults": {
                "num_frames": d.num_frames,
                "width": d.width,
                "height": d.height,
                "num_inference_steps": d.num_inference_steps,
                "guidance_scale": d.guidance_scale,
                "fps": d.fps,
                "flow_shift": d.flow_shift(d.width, d.height),
                "negative_prompt": d.negative_prompt,
            },
            "limits": {"max_num_frames": self.max_num_frames, "max_pixels": self.max_pixels},
            "note": self.note,
        }


_WAN21_480P = SamplingDefaults(81, 832, 480, 50, 5.0, 16, 3.0, 5.0, WAN_NEGATIVE_PROMPT)
_WAN21_720P = replace(_WAN21_480P, width=1280, height=720)
_WAN22_5B = SamplingDefaults(121, 1280, 704, 50, 5.0, 24, 5.0, 5.0, WAN_NEGATIVE_PROMPT)
_WAN22_A14B_T2V = SamplingDefaults(81, 1280, 720, 40, 4.0, 16, 12.0, 12.0, WAN_NEGATIVE_PROMPT)
_WAN22_A14B_I2V = SamplingDefaults(81, 1280, 720, 40, 3.5, 16, 5.0, 5.0, WAN_NEGATIVE_PROMPT)
_LANDSCAPE_PORTRAIT_480P = ((832, 480), (480, 832))
_BOTH = ((1280, 720), (720, 1280), (832, 480), (480, 832))

HUB_MODELS = (
    ModelSpec(
        "wan2.1-t2v-1.3b",
        "wan2.1-t2v",
        "WanPipeline",
        ("t2v",),
        _LANDSCAPE_PORTRAIT_480P,
        _WAN21_480P,
        hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    ),
    ModelSpec(
        "wan2.1-t2v-14b",
        "wan2.1-t2v",
        "WanPipeline",
        ("t2v",),
        _BOTH,
        _WAN21_720P,
        hub_id="Wan-AI/Wan2.1-T2V-14B-Diffusers",
    ),
    ModelSpec(
        "wan2.1-i2v-14b-480p",
        "wan2.1-i2v",
        "WanImageToVideoPipeline",
        ("i2v",),
        _LANDSCAPE_PORTRAIT_480P,
        _WAN21_480P,
        hub_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    ),
    ModelSpec(
        "wan2.1-i2v-14b-720p",
        "wan2.1-i2v",
        "WanImageToVideoPipeline",
        ("i2v",),
        ((1280, 720), (720, 1280)),
        _WAN21_720P,
        hub_id="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
    ),
    ModelSpec(
        "wan2.2-ti2v-5b",
        "wan2.2-ti2v",
        "WanPipeline",
        ("t2v", "i2v"),
        ((1280, 704), (704, 1280)),
        _WAN22_5B,
        hub_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        vae_scale=(4, 16),
    ),
    ModelSpec(
        "wan2.2-t2v-a14b",
        "wan2.2-a14b",
        "WanPipeline",
        ("t2v",),
        _BOTH,
        _WAN22_A14B_T2V,
        hub_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        boundary_ratio=0.875,
    ),
    ModelSpec(
        "wan2.2-i2v-a14b",
        "wan2.2-a14b",
        "WanImageToVideoPipeline",
        ("i2v",),
        _BOTH,
        _WAN22_A14B_I2V,
        hub_id="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        boundary_ratio=0.9,
    ),
)

# Tiny twins: one per family, toy-sized, CPU-friendly defaults and limits.
_TINY = SamplingDefaults(17, 128, 128, 4, 5.0, 16, 3.0, 5.0)
_TINY_NOTE = "tiny random-weight {} twin built in code: the video is noise, for tests and demos"
_TINY_MAX_FRAMES = 81
_TINY_MAX_PIXELS = 512 * 512
TINY_MODELS = (
    ModelSpec(
        "tiny-wan2.1-t2v",
        "wan2.1-t2v",
        "WanPipeline",
        ("t2v",),
        ((128, 128),),
        _TINY,
        weights="tiny",
        note=_TINY_NOTE.format("Wan 2.1 T2V"),
        aliases=("tiny",),
        max_num_frames=_TINY_MAX_FRAMES,
        max_pixels=_TINY_MAX_PIXELS,
    ),
    ModelSpec(
        "tiny-wan2.1-i2v",
        "wan2.1-i2v",
        "WanImageToVideoPipeline",
        ("i2v",),
        ((128, 128),),
        _TINY,
        weights="tiny",
        note=_TINY_NOTE.format("Wan 2.1 I2V"),
        max_num_frames=_TINY_MAX_FRAMES,
        max_pixels=_TINY_MAX_PIXELS,
    ),
    ModelSpec(
        "tiny-wan2.2-ti2v",
        "wan2.2-ti2v",
        "WanPipeline",
        ("t2v", "i2v"),
        ((128, 128),),
        _TINY,
        vae_scale=(4, 16),
        weights="tiny",
        note=_TINY_NOTE.format("Wan 2.2 TI2V"),
        max_num_frames=_TINY_MAX_FRAMES,
        max_pixels=_TINY_MAX_PIXELS,
    ),
    ModelSpec(
        "tiny-wan2.2-t2v-a14b",
        "wan2.2-a14b",
        "WanPipeline",
        ("t2v",),
        ((128, 128),),
        _TINY,
        boundary_ratio=0.875,
        weights="tiny",
        note=_TINY_NOTE.format("Wan 2.2 T2V A14B (two transformers)"),
        max_num_frames=_TINY_MAX_FRAMES,
        max_pixels=_TINY_MAX_PIXELS,
    ),
    ModelSpec(
        "tiny-wan2.2-i2v-a14b",
        "wan2.2-a14b",
        "WanImageToVideoPipeline",
        ("i2v",),
        ((128, 128),),
        _TINY,
        boundary_ratio=0.9,
        weights="tiny",
        note=_TINY_NOTE.format("Wan 2.2 I2V A14B (two transformers)"),
        max_num_frames=_TINY_MAX_FRAMES,
        max_pixels=_TINY_MAX_PIXELS,
    ),
)

# Full-size random-weight twins of the hub models (GPU benchmarks without downloads).
RANDOM_MODELS = tuple(
    replace(
        spec,
        id=f"{spec.id}-random",
        hub_id=None,
        weights="random",
        note=f"{spec.id} architecture with random weights: the video is noise, the cost real",
        aliases=("wan2.1-1.3b-random",) if spec.id == "wan2.1-t2v-1.3b" else (),
    )
    for spec in HUB_MODELS
)

REGISTRY: dict[str, ModelSpec] = {s.id: s for s in (*HUB_MODELS, *TINY_MODELS, *RANDOM_MODELS)}
ALIASES: dict[str, str] = {a: s.id for s in REGISTRY.values() for a in s.aliases}
# Hub ids resolve to their spec, so `MODEL=Wan-AI/Wan2.1-T2V-1.3B-Diffusers` keeps working.
HUB_IDS: dict[str, str] = {s.hub_id.lower(): s.id for s in HUB_MODELS if s.hub_id}


def resolve_model_id(name: str) -> Optional[str]:
    """The registry id that `name` (an id, alias or hub id, any case) names, or None."""
    key = name.strip()
    if key in REGISTRY:
        return key
    low = key.lower()
    return ALIASES.get(low) or HUB_IDS.get(low) or (low if low in REGISTRY else None)


def get_model(name: str) -> ModelSpec:
    """The spec `name` names; `KeyError` listing the known ids otherwise."""
    model_id = resolve_model_id(name)
    if model_id is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[model_id]


def custom_model(path: str, base: str, *, vmoba_trained: bool = False) -> ModelSpec:
    """A spec for weights outside the registry (a local directory or another hub id) with the
    architecture and defaults of registry model `base`; `vmoba_trained` marks a checkpoint
    fine-tuned with VMoBA (it then defaults to `threshold_global`)."""
    spec = get_model(base)
    return replace(
        spec,
        id=path,
        hub_id=path,
        weights="hub",
        vmoba_trained=vmoba_trained,
        aliases=(),
        note=f"{path} ({spec.id} architecture)",
    )
