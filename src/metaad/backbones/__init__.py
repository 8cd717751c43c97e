"""Frozen, offline-first feature extractors (timm architectures with pinned weight sources)."""

from metaad.backbones.registry import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneWeightsError,
    create_backbone,
    load_pretrained,
    normalization,
)

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneWeightsError",
    "create_backbone",
    "load_pretrained",
    "normalization",
]
