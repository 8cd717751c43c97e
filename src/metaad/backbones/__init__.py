"""Frozen, offline-first feature extractors (timm architectures with pinned weight sources)."""

from metaad.backbones.registry import (
    BACKBONES,
    NORMALIZATION,
    Backbone,
    BackboneWeightsError,
    create_backbone,
    load_pretrained,
    normalization,
)

__all__ = [
    "BACKBONES",
    "NORMALIZATION",
    "Backbone",
    "BackboneWeightsError",
    "create_backbone",
    "load_pretrained",
    "normalization",
]
