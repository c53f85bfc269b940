"""How long a request should take on a worker, from its size and the worker's measured speed.

The worker times its jobs out with it (`estimate_s`); the API refuses a request whose lower bound
(`lower_bound_s`) on the fastest serving worker exceeds `MAX_JOB_S`. A job's timeout is `factor x estimate` (clamped to
`[JOB_TIMEOUT_MIN_S, JOB_TIMEOUT_MAX_S]`), not RQ's fixed 180 s. The estimate has three parts:

- denoising: `steps x passes x tokens x max(1, tokens / ref_tokens) x s_per_unit`, with
  `passes = 2` under classifier-free guidance (`guidance_scale > 1`: two transformer calls per
  step) and `tokens = T*Hg*Wg` of the latent grid (Wan: `T = 1 + (frames-1)/4`, `Hg = height/16`,
  `Wg = width/16`). Cost is linear in tokens up to the size it was measured at and grows
  quadratically beyond (attention dominates long sequences), so extrapolating up overestimates,
  which is the safe side for a timeout;
- decoding and encoding: `frames x height x width / 1e6 x s_per_mpx`;
- a fixed part (text encoder, bookkeeping).

The worker measures `s_per_unit` and `s_per_mpx` in its warm-up generation and refines them after
every completed job (exponential average), and publishes them in its heartbeat (`to_dict`; the
API reads them back with `from_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

# Wan 2.1 (and the tiny model, built with the same compression): VAE 4x temporal, 8x spatial,
# transformer patch 1x2x2, so one token covers 4 frames x 16 x 16 pixels.
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 16
# Weight of a new measurement in the running average.
EMA_WEIGHT = 0.3


def latent_tokens(num_frames: int, height: int, width: int) -> int:
    """Tokens the transformer sees: `T*Hg*Wg` (81x480x832 -> 21*30*52 = 32760)."""
    return (
        (1 + (num_frames - 1) // TEMPORAL_STRIDE)
        * (height // SPATIAL_STRIDE)
        * (width // SPATIAL_STRIDE)
    )


@dataclass(frozen=True)
class Shape:
    """The size of a request, as far as cost goes."""

    num_frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float

    @classmethod
    def of(cls, request) -> Shape:
        return cls(
            request.num_frames,
            request.height,
            request.width,
            request.num_inference_steps,
            request.guidance_scale,
        )

    @property
    def tokens(self) -> int:
        return latent_tokens(self.num_frames, self.height, self.width)

    @property
    def passes(self) -> int:
        return 2 if self.guidance_scale > 1.0 else 1

    @property
    def megapixels(self) -> float:
        return self.num_frames * self.height * self.width / 1e6

    def denoise_units(self, ref_tokens: int) -> float:
        """Work of one generation's denoising in units of "one pass over one token"."""
        tokens = self.tokens
        return self.steps * self.passes * tokens * max(1.0, tokens / max(1, ref_tokens))


@dataclass
class SpeedModel:
    """This worker's measured speed (see the module docstring)."""

    s_per_unit: float
    s_per_mpx: float
    fixed_s: float
    ref_tokens: int
    samples: int = 0

    def estimate_s(self, shape: Shape) -> float:
        """The run time, erring long above the measured size (for timeouts)."""
        return (
            self.fixed_s
            + shape.denoise_units(self.ref_tokens) * self.s_per_unit
            + shape.megapixels * self.s_per_mpx
        )

    def lower_bound_s(self, shape: Shape) -> float:
        """The run time with denoising linear in tokens at every size: never more than the real
        one, as attention only adds to it (for admission: refuse only what cannot fit)."""
        linear_units = shape.denoise_units(ref_tokens=shape.tokens)
        return self.fixed_s + linear_units * self.s_per_unit + shape.megapixels * self.s_per_mpx

    def timeout_s(self, shape: Shape, *, factor: float, min_s: float, max_s: float) -> float:
        return min(max_s, max(min_s, factor * self.estimate_s(shape)))

    def observe(
        self, shape: Shape, *, denoise_s: float, decode_encode_s: float, fixed_s: float
    ) -> None:
        """Fold one measured generation into the averages (the first one replaces the prior)."""
        unit = denoise_s / max(shape.denoise_units(self.ref_tokens), 1e-9)
        mpx = decode_encode_s / max(shape.megapixels, 1e-9)
        w = 1.0 if self.samples == 0 else EMA_WEIGHT
        self.s_per_unit = (1 - w) * self.s_per_unit + w * unit
        self.s_per_mpx = (1 - w) * self.s_per_mpx + w * mpx
        self.fixed_s = (1 - w) * self.fixed_s + w * fixed_s
        self.samples += 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Optional[SpeedModel]:
        """A heartbeat's speed if it is well formed and measured (`samples > 0`), else None."""
        if not isinstance(data, dict):
            return None
        try:
            model = cls(
                s_per_unit=float(data["s_per_unit"]),
                s_per_mpx=float(data["s_per_mpx"]),
                fixed_s=float(data["fixed_s"]),
                ref_tokens=int(data["ref_tokens"]),
                samples=int(data.get("samples", 0)),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return model if model.samples > 0 else None

    @classmethod
    def prior(cls, device: str) -> SpeedModel:
        """Before any measurement: deliberately slow guesses (a timeout must not fire early)."""
        if device.startswith("cuda"):  # "cuda:1": a rank of a worker group
            # ~H100 with Wan 1.3B at 480p: ~1 s per CFG step at 32k tokens; decode ~1 s/Mpx.
            return cls(s_per_unit=2e-5, s_per_mpx=1.0, fixed_s=10.0, ref_tokens=32760)
        return cls(s_per_unit=1e-3, s_per_mpx=1.0, fixed_s=10.0, ref_tokens=1024)
