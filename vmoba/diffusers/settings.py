"""The settings a VMoBA call accepts: `AttentionSettings` (defined in `vmoba.config`, beside
`VMoBAConfig`) given as an instance, a JSON-style dict or `None`, plus field overrides."""

from __future__ import annotations

from ..config import ATTENTION_BACKENDS, KERNELS, AttentionSettings

__all__ = ["ATTENTION_BACKENDS", "KERNELS", "AttentionSettings", "coerce_settings"]


def coerce_settings(settings, overrides: dict) -> AttentionSettings:
    """`settings` (`AttentionSettings`, dict or `None` for the defaults) with `overrides` applied."""
    if settings is None:
        settings = AttentionSettings()
    elif not isinstance(settings, AttentionSettings):
        settings = AttentionSettings.from_dict(settings)
    return settings.replace(**overrides) if overrides else settings
