"""Frozen, offline-first feature extractors (timm architectures with pinned weight sources)."""

from metaad.backbones.registry import (
    BACKBONES,
    Backbone,
    BackboneWeightsError,
    create_backbone,
    load_pretrained,
)

__all__ = ["BACKBONES", "Backbone", "BackboneWeightsError", "create_backbone", "load_pretrained"]
