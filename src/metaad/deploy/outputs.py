"""The files ``metaad predict`` can write (``--outputs``), named once; imports nothing heavy, so a wrong list is
refused before torch loads."""

from __future__ import annotations

OUTPUTS = ("csv", "maps", "masks", "overlays", "figures")
DEFAULT_OUTPUTS = ("csv", "maps", "masks", "overlays")


def parse_outputs(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"csv,maps"`` (or a sequence) as the outputs to write; None: the defaults. ``csv`` is always written."""
    if spec is None:
        return DEFAULT_OUTPUTS
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = sorted(set(names) - set(OUTPUTS))
    if unknown or not names:
        raise ValueError(f"--outputs {spec!r}: expected a comma-separated choice of {', '.join(OUTPUTS)}")
    return tuple(dict.fromkeys(["csv", *names]))
