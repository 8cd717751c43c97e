"""A seeded synthetic industrial-inspection data set in MVTec AD layout: metaad's embedded default.

No real data ships with metaad, so demos and tests use this generator. It writes::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png   (0/255, same size; none for good images)

Three textured surfaces (``weave`` grayscale, ``grain`` wood, ``leather``) and three objects on a
background (``cap`` round part, ``screw`` grayscale, ``board`` with components at fixed positions).
Defect-free images vary in texture phase, object pose, lighting and sensor noise. Every defect image is
rendered clean first and the defect is drawn on top, so the mask is exactly the set of pixels the defect
changed; pixels outside it are byte-identical to the clean image (see :func:`generate_pair`).

Each image draws from its own ``numpy.random.Generator`` keyed by (seed, category, folder, index): the same
seed gives byte-identical files, and changing a count never reshuffles the other images.
"""

from __future__ import annotations

import itertools
import operator
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TEXTURE_CATEGORIES = ("weave", "grain", "leather")
OBJECT_CATEGORIES = ("cap", "screw", "board")
CATEGORIES: tuple[str, ...] = TEXTURE_CATEGORIES + OBJECT_CATEGORIES
TEXTURE_DEFECTS = ("scratch", "crack", "hole", "stain")
SURFACE_DEFECTS = (*TEXTURE_DEFECTS, "shading")  # what draw_surface_defect can draw on any image
# Low-contrast defects a few pixels in size, for validation that a frozen-feature nearest neighbour does not
# find trivially: brightness changes of 3-30% of the full scale (grey on grey images; the range of real
# magnetic-tile defects' contrast), 1-3 px cracks and scratches, pits of a few pixels. Sizes are in the canvas's
# own pixels: draw on the image at its camera resolution.
SUBTLE_DEFECTS = ("fine_crack", "pit", "faint_stain", "faint_shading", "fine_scratch")
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "weave": TEXTURE_DEFECTS,
    "grain": TEXTURE_DEFECTS,
    "leather": TEXTURE_DEFECTS,
    "cap": ("scratch", "hole", "stain", "missing_part", "misplaced_part"),
    "screw": ("scratch", "stain", "missing_part"),
    "board": ("scratch", "stain", "missing_part", "misplaced_part"),
}
IMAGE_MODES: dict[str, str] = {c: "L" if c in ("weave", "screw") else "RGB" for c in CATEGORIES}
"""PIL mode of each category's PNGs: ``"L"`` (single channel, HxW arrays) or ``"RGB"`` (HxWx3)."""

# Demo defaults: 60 train, 20 good test and 10 test images per defect type at 256 px: 110-130 images per
# category, 720 images + 240 masks (65 MB) for all six, written in about 20-40 s on 2 cores.
DEFAULT_N_TRAIN = 60
DEFAULT_N_TEST_GOOD = 20
DEFAULT_N_TEST_PER_DEFECT = 10
DEFAULT_SIZE = 256
MIN_SIZE = 32
GOOD = "good"
_DRAW_ALPHA = 0.05  # soft defect edges below 5% opacity are not drawn, so the mask is exactly what changed


# ----------------------------------------------------------------------------- drawing helpers


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image units (0..1), as (x, y) arrays of shape (size, size)."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(axis, axis)


def _coverage(sdf: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a signed distance field given in image units."""
    return np.clip(0.5 - sdf * size, 0.0, 1.0)


def _box(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float, radius: float = 0.0) -> np.ndarray:
    """Signed distance to a (rounded) box centred at the origin."""
    qu = np.abs(u) - (half_u - radius)
    qv = np.abs(v) - (half_v - radius)
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    return outside + np.minimum(np.maximum(qu, qv), 0.0) - radius


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int], size: int) -> np.ndarray:
    """Zero-mean, unit-variance value noise: a (rows, cols) grid of normals upsampled bicubically."""
    grid = rng.standard_normal(cells).astype(np.float32)
    up = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))
    return (up - up.mean()) / (up.std() + 1e-6)


def _rotate(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of (x, y) in a frame centred at (cx, cy) and turned by ``angle`` radians."""
    c, s = float(np.cos(angle)), float(np.sin(angle))  # Python floats keep float32 arrays float32
    dx, dy = x - float(cx), y - float(cy)
    return c * dx + s * dy, -s * dx + c * dy


def _blend(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``image`` (H, W, C) painted with ``colour`` (broadcastable to it) at opacity ``alpha`` (H, W).

    Only the bounding box of ``alpha > 0`` is computed: most layers are small.
    """
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    if rows.size == 0:
        return image
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a = alpha[box][..., None]
    out = image.astype(np.float32)  # a copy
    out[box] = image[box] * (1.0 - a) + np.broadcast_to(colour, image.shape)[box] * a
    return out


def _stroke(points: np.ndarray, halfwidth: np.ndarray, size: int) -> np.ndarray:
    """Coverage of a polyline (image units, (N, 2) as x, y) with a per-segment half width in pixels."""
    pts = points * size
    alpha = np.zeros((size, size), dtype=np.float32)
    pad = float(halfwidth.max()) + 2.0
    x0, y0 = np.maximum(np.floor(pts.min(0) - pad).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(pts.max(0) + pad).astype(int), size)
    if x0 >= x1 or y0 >= y1:
        return alpha
    ys, xs = np.mgrid[y0:y1, x0:x1]
    pix = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1).astype(np.float32)
    best = np.zeros(len(pix), dtype=np.float32)
    a, b = pts[:-1], pts[1:]
    ab = b - a
    denom = (ab**2).sum(1) + 1e-9
    for start in range(0, len(a), 64):  # chunks keep the (pixels x segments) arrays small
        sl = slice(start, start + 64)
        ap = pix[:, None, :] - a[None, sl]
        t = np.clip((ap * ab[None, sl]).sum(-1) / denom[None, sl], 0.0, 1.0)
        dist = np.linalg.norm(ap - t[..., None] * ab[None, sl], axis=-1)
        best = np.maximum(best, np.clip(halfwidth[None, sl] + 0.5 - dist, 0.0, 1.0).max(1))
    alpha[y0:y1, x0:x1] = best.reshape(ys.shape)
    return alpha


# ----------------------------------------------------------------------------- scenes

_Draw = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class _Part:
    """A removable, movable component: ``draw(u, v) -> (sdf, colour)`` in its own frame."""

    name: str
    center: tuple[float, float]
    angle: float
    extent: float  # rough radius, scales how far a misplaced part moves
    draw: _Draw


@dataclass
class _Scene:
    """A clean rendering before lighting and noise: base layer, removable parts, defect-eligible region."""

    size: int
    base: np.ndarray  # (H, W, C) float in [0, 1], without the parts
    region: np.ndarray  # (H, W) coverage of the surface where scratches, holes and stains may land
    u: np.ndarray | None = None  # object-frame coordinates (objects only)
    v: np.ndarray | None = None
    parts: tuple[_Part, ...] = ()


def _part_layer(scene: _Scene, part: _Part, shift: tuple[float, float] = (0.0, 0.0), turn: float = 0.0):
    """Coverage (H, W) and colour of a part, optionally moved by ``shift`` and turned by ``turn``."""
    lu, lv = _rotate(
        scene.u, scene.v, part.center[0] + shift[0], part.center[1] + shift[1], part.angle + turn
    )
    sdf, colour = part.draw(lu, lv)
    return _coverage(sdf, scene.size), colour


def _compose(
    scene: _Scene, skip: str | None = None, moved: tuple[str, tuple[float, float], float] | None = None
):
    """Base layer with the parts painted on, leaving out ``skip``, placing ``moved`` = (name, shift, turn)."""
    image = scene.base
    for part in scene.parts:
        if part.name == skip:
            continue
        if moved is not None and part.name == moved[0]:
            alpha, colour = _part_layer(scene, part, moved[1], moved[2])
        else:
            alpha, colour = _part_layer(scene, part)
        image = _blend(image, colour, alpha)
    return image


def _render_weave(rng: np.random.Generator, size: int) -> _Scene:
    """Plain-weave fabric: alternating warp/weft threads with waviness and fibre noise (grayscale)."""
    x, y = _coords(size)
    period = rng.uniform(0.058, 0.068)
    u, v = _rotate(x, y, -rng.uniform(0, 2 * period), -rng.uniform(0, 2 * period), rng.normal(0.0, 0.025))
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    a = (u + 0.08 * period * np.sin(2 * np.pi * v / (6.3 * period) + p1)) / period
    b = (v + 0.08 * period * np.sin(2 * np.pi * u / (5.7 * period) + p2)) / period
    ia, ib = np.floor(a), np.floor(b)
    fa, fb = a - ia, b - ib
    warp = np.sin(np.pi * fa) ** 0.7 * (0.7 + 0.3 * np.sin(np.pi * fb))
    weft = np.sin(np.pi * fb) ** 0.7 * (0.7 + 0.3 * np.sin(np.pi * fa))
    threads = np.where((ia + ib) % 2 == 0, warp, weft)
    fibre = _smooth_noise(rng, (96, 96), size)
    image = 0.14 + rng.uniform(0.42, 0.5) * threads + 0.035 * fibre
    return _Scene(size, image[..., None].astype(np.float32), np.ones((size, size), np.float32))


def _render_grain(rng: np.random.Generator, size: int) -> _Scene:
    """Wood: growth rings along x, bent by stretched turbulence, with fine streaks."""
    x, y = _coords(size)
    turbulence = _smooth_noise(rng, (10, 4), size)
    streaks = _smooth_noise(rng, (160, 12), size)
    rings = (y + rng.normal(0.0, 0.12) * x) * rng.uniform(5.0, 8.0) + 0.3 * turbulence + rng.uniform(0, 1)
    latewood = (rings - np.floor(rings)) ** 4  # ring fades in slowly and ends in a sharp dark band
    mix = np.clip(0.75 - 0.5 * latewood + 0.08 * streaks, 0.0, 1.0)[..., None]
    light = np.array([0.82, 0.64, 0.43], np.float32) * rng.uniform(0.94, 1.04)
    dark = np.array([0.48, 0.30, 0.16], np.float32) * rng.uniform(0.94, 1.04)
    return _Scene(size, (dark + (light - dark) * mix).astype(np.float32), np.ones((size, size), np.float32))


def _render_leather(rng: np.random.Generator, size: int) -> _Scene:
    """Leather: pebbled grain, thin creases and slow tone changes."""
    pebble = _smooth_noise(rng, (56, 56), size)
    creases = np.exp(-((_smooth_noise(rng, (14, 14), size) / 0.12) ** 2))
    tone = _smooth_noise(rng, (5, 5), size)
    colour = np.array([0.50, 0.33, 0.22], np.float32) * rng.uniform(0.92, 1.08)
    shade = 1.0 + 0.12 * pebble + 0.06 * tone - 0.22 * creases
    return _Scene(size, (colour * shade[..., None]).astype(np.float32), np.ones((size, size), np.float32))


def _object_frame(rng: np.random.Generator, size: int, shift: float, turn: float):
    """Image coordinates and the object frame of a randomly placed object (small shift and rotation)."""
    x, y = _coords(size)
    cx, cy = 0.5 + np.clip(rng.normal(0.0, shift / 2, 2), -shift, shift)
    u, v = _rotate(x, y, cx, cy, rng.uniform(-turn, turn))
    return x, y, cx, cy, u, v


def _render_cap(rng: np.random.Generator, size: int) -> _Scene:
    """A round plastic cap with a knurled rim, a central boss and a printed tab, on a dark table."""
    x, y, cx, cy, u, v = _object_frame(rng, size, shift=0.04, turn=0.25)
    radius = rng.uniform(0.30, 0.32)
    table = 0.17 + 0.025 * _smooth_noise(rng, (6, 6), size)
    table = table[..., None] * np.array([0.95, 1.0, 1.08], np.float32)
    shadow = np.clip((radius + 0.035 - np.hypot(u - 0.015, v - 0.02)) / 0.05, 0.0, 1.0)
    table = table * (1.0 - 0.5 * shadow[..., None])
    r = np.hypot(u, v)
    dome = 0.68 + 0.32 * np.sqrt(np.clip(1.0 - (r / radius) ** 2, 0.0, 1.0))
    knurl = np.where(r > 0.88 * radius, 0.85 + 0.15 * np.cos(72 * np.arctan2(v, u)), 1.0)
    highlight = np.exp(-((x - cx + 0.1) ** 2 + (y - cy + 0.12) ** 2) / (2 * 0.06**2))
    red = np.array([0.74, 0.13, 0.10], np.float32) * rng.uniform(0.94, 1.06)
    body = red * (dome * knurl)[..., None] + 0.3 * highlight[..., None]
    disk = _coverage(r - radius, size)

    def boss(lu: np.ndarray, lv: np.ndarray):
        rr = np.hypot(lu, lv)
        groove = 1 - 0.35 * np.exp(-(((rr - 0.06) / 0.006) ** 2))
        shade = (0.8 + 0.2 * np.clip(1 - rr / 0.085, 0, 1)) * groove
        return rr - 0.085, np.array([0.88, 0.84, 0.80], np.float32) * shade[..., None]

    def tab(lu: np.ndarray, lv: np.ndarray):
        return _box(lu, lv, 0.045, 0.018, 0.01), np.array([0.93, 0.92, 0.86], np.float32)

    parts = (_Part("boss", (0.0, 0.0), 0.0, 0.085, boss), _Part("tab", (0.2, 0.0), 0.0, 0.045, tab))
    base = _blend(table, body, disk).astype(np.float32)
    return _Scene(size, base, disk, u, v, parts)


def _render_screw(rng: np.random.Generator, size: int) -> _Scene:
    """A threaded screw lying on a bright plate: head and tip are removable parts (grayscale)."""
    _, _, _, _, u, v = _object_frame(rng, size, shift=0.03, turn=0.2)
    pitch, w = rng.uniform(0.028, 0.032), 0.042
    plate = 0.78 + 0.025 * _smooth_noise(rng, (4, 4), size)
    shadow = np.clip((0.02 - _box(u - 0.01, v - 0.015, 0.36, 0.09, 0.03)) / 0.04, 0.0, 1.0)
    plate = (plate * (1.0 - 0.3 * shadow))[..., None]
    tooth = 0.012 * np.abs(2 * ((u / pitch) % 1.0) - 1.0)

    def metal(lv: np.ndarray, half: float | np.ndarray) -> np.ndarray:
        t = np.clip(lv / half, -1, 1)
        return 0.16 + 0.26 * (1 - t**2) + 0.16 * np.exp(-(((t + 0.4) / 0.2) ** 2))

    thread_shade = 0.8 + 0.2 * np.cos(2 * np.pi * u / pitch)
    shaft_sdf = np.maximum(np.abs(v) - (w + tooth), np.abs(u) - 0.24)
    shaft = (metal(v, w + 0.012) * thread_shade)[..., None]

    def head(lu: np.ndarray, lv: np.ndarray):
        slot = 1 - 0.6 * np.exp(-((lu / 0.007) ** 2))
        return _box(lu, lv, 0.045, 0.085, 0.02), (metal(lv, 0.085) * slot)[..., None]

    def tip(lu: np.ndarray, lv: np.ndarray):
        half = w * np.clip(1 - (lu + 0.03) / 0.09, 0.0, 1.0) + 0.012 * np.abs(2 * ((lu / pitch) % 1.0) - 1.0)
        sdf = np.maximum(np.maximum(np.abs(lv) - half, -0.03 - lu), lu - 0.06)
        return sdf, (metal(lv, w + 0.012) * (0.8 + 0.2 * np.cos(2 * np.pi * lu / pitch)))[..., None]

    parts = (_Part("head", (-0.285, 0.0), 0.0, 0.085, head), _Part("tip", (0.27, 0.0), 0.0, 0.06, tip))
    shaft_alpha = _coverage(shaft_sdf, size)
    scene = _Scene(size, _blend(plate, shaft, shaft_alpha).astype(np.float32), shaft_alpha, u, v, parts)
    for part in parts:
        scene.region = np.maximum(scene.region, _part_layer(scene, part)[0])
    return scene


# Board layout in board units: (name, centre, angle, kind). Fixed, as on a real assembly line.
_BOARD_LAYOUT = (
    ("ic_large", (-0.17, -0.14), 0.0, "ic_large"),
    ("ic_small", (0.2, -0.16), 0.0, "ic_small"),
    ("led", (0.0, -0.02), 0.0, "led"),
    ("resistor_1", (-0.22, 0.17), np.pi / 2, "resistor"),
    ("resistor_2", (-0.08, 0.17), np.pi / 2, "resistor"),
    ("resistor_3", (0.06, 0.17), np.pi / 2, "resistor"),
    ("capacitor", (0.24, 0.17), 0.0, "capacitor"),
)
_TRACES = (
    ((-0.17, -0.04), (-0.17, 0.06), (-0.22, 0.09)),
    ((-0.05, -0.14), (0.12, -0.14)),
    ((0.2, -0.08), (0.2, 0.0), (0.24, 0.05), (0.24, 0.09)),
    ((-0.02, -0.02), (-0.08, 0.04), (-0.08, 0.09)),
    ((0.02, -0.02), (0.06, 0.04), (0.06, 0.09)),
    ((-0.22, 0.25), (-0.22, 0.32), (0.06, 0.32), (0.06, 0.25)),
    ((-0.38, -0.3), (-0.3, -0.3), (-0.27, -0.2)),
)
_SILVER = np.array([0.78, 0.78, 0.74], np.float32)


def _ic_pins(
    lu: np.ndarray, lv: np.ndarray, half_u: float, half_v: float, n: int, reach: float
) -> np.ndarray:
    """Signed distance to ``n`` gull-wing pins on both long sides of an IC body."""
    pitch = 2 * half_u / n
    pu = np.abs(((lu + half_u) % pitch) - pitch / 2)
    pin = np.maximum(pu - 0.25 * pitch, np.abs(np.abs(lv) - (half_v + reach / 2)) - reach / 2)
    return np.maximum(pin, np.abs(lu) - half_u)


def _component(kind: str) -> tuple[_Draw, float]:
    """Drawing function and extent of a board component kind."""
    if kind in ("ic_large", "ic_small"):
        half_u, half_v, n = (0.12, 0.07, 6) if kind == "ic_large" else (0.06, 0.06, 3)

        def ic(lu: np.ndarray, lv: np.ndarray):
            body = _box(lu, lv, half_u, half_v, 0.005)
            pins = _ic_pins(lu, lv, half_u, half_v, n, 0.025)
            dot = np.hypot(lu + half_u - 0.025, lv + half_v - 0.025) < 0.012
            colour = np.where((body <= 0)[..., None], np.float32(0.11), _SILVER)
            colour = np.where(dot[..., None], np.float32(0.3), colour)
            return np.minimum(body, pins), colour

        return ic, max(half_u, half_v + 0.025)
    if kind == "resistor":

        def resistor(lu: np.ndarray, lv: np.ndarray):
            bands = (np.abs(lu + 0.02) < 0.006) | (np.abs(lu) < 0.006) | (np.abs(lu - 0.02) < 0.006)
            colour = np.where(bands[..., None], np.array([0.55, 0.15, 0.1], np.float32), [0.82, 0.72, 0.52])
            colour = np.where((np.abs(lu) > 0.036)[..., None], _SILVER, colour)
            return _box(lu, lv, 0.045, 0.018, 0.004), colour

        return resistor, 0.045
    if kind == "capacitor":

        def capacitor(lu: np.ndarray, lv: np.ndarray):
            r = np.hypot(lu, lv)
            groove = (np.minimum(np.abs(lu), np.abs(lv)) < 0.004) & (r < 0.045)
            blue = np.array([0.12, 0.16, 0.45], np.float32)
            colour = np.where((r < 0.045)[..., None], _SILVER * 0.95, blue)
            return r - 0.065, np.where(groove[..., None], np.float32(0.35), colour)

        return capacitor, 0.065

    def led(lu: np.ndarray, lv: np.ndarray):
        glint = np.exp(-((lu + 0.008) ** 2 + (lv + 0.008) ** 2) / (2 * 0.006**2))[..., None]
        return np.hypot(lu, lv) - 0.025, np.array([0.85, 0.1, 0.08], np.float32) * (1 - glint) + glint

    return led, 0.025


def _render_board(rng: np.random.Generator, size: int) -> _Scene:
    """A small circuit board: green solder mask, traces, silkscreen outlines, pads and seven components."""
    _, _, _, _, u, v = _object_frame(rng, size, shift=0.02, turn=0.05)
    grey = np.array([1.0, 0.98, 0.95], np.float32)
    table = (0.55 + 0.03 * _smooth_noise(rng, (5, 5), size))[..., None] * grey
    outline = _box(u, v, 0.44, 0.40, 0.03)
    green = np.array([0.09, 0.38, 0.18], np.float32) * rng.uniform(0.93, 1.07)
    pcb = green * (1.0 + 0.04 * _smooth_noise(rng, (40, 40), size))[..., None]
    board = _coverage(outline, size)
    image = _blend(table, pcb, board)
    for trace in _TRACES:
        points = np.array(trace, np.float32)
        dist = np.full(u.shape, np.inf, np.float32)
        for (au, av), (bu, bv) in itertools.pairwise(points):
            du, dv = bu - au, bv - av
            t = np.clip(((u - au) * du + (v - av) * dv) / (du * du + dv * dv), 0.0, 1.0)
            dist = np.minimum(dist, np.hypot(u - au - t * du, v - av - t * dv))
        image = _blend(image, np.array([0.16, 0.52, 0.27], np.float32), _coverage(dist - 0.006, size))
    for hu, hv in ((-0.39, -0.35), (0.39, -0.35), (-0.39, 0.35), (0.39, 0.35)):
        r = np.hypot(u - hu, v - hv)
        image = _blend(image, _SILVER, _coverage(r - 0.022, size))
        image = _blend(image, np.float32(0.2), _coverage(r - 0.012, size))
    parts = []
    for name, (pu, pv), angle, kind in _BOARD_LAYOUT:
        draw, extent = _component(kind)
        lu, lv = _rotate(u, v, pu, pv, angle)
        silk = np.abs(_box(lu, lv, extent + 0.02, (0.09 if kind == "ic_large" else extent) + 0.02, 0.01))
        image = _blend(image, np.float32(0.92), _coverage(silk - 0.003, size))
        pads = np.minimum(
            _box(lu - 0.85 * extent, lv, 0.02, 0.022), _box(lu + 0.85 * extent, lv, 0.02, 0.022)
        )
        image = _blend(image, _SILVER, _coverage(pads, size))
        parts.append(_Part(name, (pu, pv), angle, extent, draw))
    return _Scene(size, image.astype(np.float32), board, u, v, tuple(parts))


_RENDERERS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "weave": _render_weave,
    "grain": _render_grain,
    "leather": _render_leather,
    "cap": _render_cap,
    "screw": _render_screw,
    "board": _render_board,
}


# ----------------------------------------------------------------------------- defects


def _pick_point(rng: np.random.Generator, region: np.ndarray, margin: float = 0.08) -> np.ndarray:
    """A random (x, y) point in image units on the defect-eligible region."""
    size = region.shape[0]
    for _ in range(200):
        point = rng.uniform(margin, 1 - margin, 2)
        if region[int(point[1] * size), int(point[0] * size)] > 0.9:
            return point
    raise RuntimeError("synthetic generator: no room for a defect on this image's surface")


def _contrast(image: np.ndarray, alpha: np.ndarray) -> float:
    """+1 if the surface under ``alpha`` is dark (draw bright), else -1."""
    weights = alpha / (alpha.sum() + 1e-6)
    return 1.0 if float((image.mean(-1) * weights).sum()) < 0.5 else -1.0


def _scratch(rng: np.random.Generator, image: np.ndarray, region: np.ndarray):
    """A thin curved line (quadratic Bezier), tapered at both ends, brighter or darker than the surface."""
    size = region.shape[0]
    centre, length, angle = _pick_point(rng, region), rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    control = centre + normal * rng.normal(0.0, 0.25) * length
    t = np.linspace(0.0, 1.0, 48)[:, None]
    start, end = centre - direction * length / 2, centre + direction * length / 2
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    mid = (t[1:, 0] + t[:-1, 0]) / 2
    halfwidth = np.maximum(rng.uniform(0.5, 1.1) * size / 256, 0.5) * np.sin(np.pi * mid) ** 0.3
    alpha = _stroke(points, halfwidth.astype(np.float32), size) * region
    delta = _contrast(image, alpha) * rng.uniform(0.38, 0.5)
    return image + alpha[..., None] * delta, alpha


def _crack(rng: np.random.Generator, image: np.ndarray, region: np.ndarray):
    """A dark, branching random-walk crack, thinner on its branches."""
    size = region.shape[0]
    step, width = 0.004, max(rng.uniform(0.8, 1.3) * size / 256, 0.6)
    start, heading, steps = (
        _pick_point(rng, region),
        rng.uniform(0, 2 * np.pi),
        int(rng.uniform(0.15, 0.3) / step),
    )
    walks = [(start, heading, steps, width, 0)]
    alpha = np.zeros_like(region)
    while walks:
        position, heading, steps, halfwidth, depth = walks.pop()
        points = [position]
        for _ in range(steps):
            heading += rng.normal(0.0, 0.3)
            position = position + step * np.array([np.cos(heading), np.sin(heading)])
            points.append(position)
            if depth < 2 and rng.random() < 0.05:
                turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
                walks.append((position, heading + turn, steps // 2, max(halfwidth * 0.6, 0.5), depth + 1))
        taper = np.linspace(1.0, 0.4, len(points) - 1)
        alpha = np.maximum(alpha, _stroke(np.array(points), (halfwidth * taper).astype(np.float32), size))
    alpha = alpha * region
    return image * (1.0 - 0.85 * alpha[..., None]), alpha


def _hole(rng: np.random.Generator, image: np.ndarray, region: np.ndarray):
    """An irregular hole: a dark pit with a bright raised rim, or (30%) a bright through-hole, dark rim."""
    size = region.shape[0]
    x, y = _coords(size)
    centre, r0 = _pick_point(rng, region, margin=0.12), rng.uniform(0.025, 0.05)
    theta = np.arctan2(y - centre[1], x - centre[0])
    wobble = sum(rng.normal(0, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    radius = r0 * (1 + wobble)
    dist = np.hypot(x - centre[0], y - centre[1]) - radius
    rim_alpha = _coverage(dist - r0 * rng.uniform(0.25, 0.45), size) * region
    pit_alpha = _coverage(dist, size) * region
    if rng.random() < 0.7:
        rim, pit = np.clip(image + 0.35, 0, 1), 0.04 + 0.1 * np.clip(1 + dist / r0, 0, 1)[..., None]
    else:
        rim, pit = image * 0.45, np.float32(0.96)
    return _blend(_blend(image, rim, rim_alpha), pit, pit_alpha), rim_alpha


_STAIN_COLOURS = np.array(
    [[0.36, 0.22, 0.08], [0.08, 0.08, 0.09], [0.18, 0.28, 0.62], [0.86, 0.80, 0.32], [0.92, 0.92, 0.9]],
    np.float32,
)


def _stain(rng: np.random.Generator, image: np.ndarray, region: np.ndarray):
    """A soft coloured blotch (rust, oil, ink, residue) with a noisy outline; partly shows the surface."""
    size = region.shape[0]
    x, y = _coords(size)
    centre, radius = _pick_point(rng, region), rng.uniform(0.05, 0.12)
    wobble = _smooth_noise(rng, (12, 12), size)
    blob = 1 - (np.hypot(x - centre[0], y - centre[1]) / radius) ** 2 + 0.35 * wobble
    alpha = rng.uniform(0.6, 0.85) * np.clip(blob / 0.35, 0.0, 1.0) * region
    palette = _STAIN_COLOURS[:, : image.shape[-1]] if image.shape[-1] == 3 else _STAIN_COLOURS[[1, 4], :1]
    weights = alpha / (alpha.sum() + 1e-6)
    surface = (image * weights[..., None]).sum((0, 1))
    far = palette[np.abs(palette - surface).max(1) > 0.3]
    colour = far[rng.integers(len(far))] if len(far) else palette[np.abs(palette - surface).max(1).argmax()]
    return _blend(image, colour, alpha), alpha


def _shading(rng: np.random.Generator, image: np.ndarray, region: np.ndarray):
    """Uneven shading: a large soft-edged patch somewhat brighter or darker than the surface around it (an
    uneven coating, polish or sintering), with no edge or texture of its own."""
    size = region.shape[0]
    x, y = _coords(size)
    centre, radius = _pick_point(rng, region, margin=0.15), rng.uniform(0.12, 0.25)
    wobble = _smooth_noise(rng, (6, 6), size)
    distance = np.hypot(x - centre[0], y - centre[1]) / radius + 0.25 * wobble
    alpha = np.clip((1.0 - distance) / 0.5, 0.0, 1.0) * region
    gain = rng.uniform(0.3, 0.5) * rng.choice([-1.0, 1.0])
    return image * (1.0 + gain * alpha[..., None]), alpha


def _missing_part(rng: np.random.Generator, scene: _Scene):
    """A component left out: the mask is its footprint."""
    part = scene.parts[rng.integers(len(scene.parts))]
    alpha, _ = _part_layer(scene, part)
    return _compose(scene, skip=part.name), (alpha > 0).astype(np.float32)


def _misplaced_part(rng: np.random.Generator, scene: _Scene):
    """A component shifted and turned on the object: the mask is the union of the old and new footprints."""
    footprints = {p.name: _part_layer(scene, p)[0] for p in scene.parts}
    for _ in range(100):
        part = scene.parts[rng.integers(len(scene.parts))]
        angle = rng.uniform(0, 2 * np.pi)
        distance = rng.uniform(0.6, 1.1) * part.extent + 0.02
        shift = (distance * np.cos(angle), distance * np.sin(angle))
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.6)
        new, _ = _part_layer(scene, part, shift, turn)
        outside = float((new * (1 - scene.region)).sum())
        others = [alpha for name, alpha in footprints.items() if name != part.name]
        if outside < 0.5 and all(float((new * o).sum()) == 0.0 for o in others):
            moved = (footprints[part.name] > 0) | (new > 0)
            return _compose(scene, moved=(part.name, shift, turn)), moved.astype(np.float32)
    raise RuntimeError("synthetic generator: found no free place to move a part to")


def _fine_crack(rng: np.random.Generator, image: np.ndarray, region: np.ndarray):
    """A hairline crack: a branching random walk 1-3 px wide, 8-22% of the full scale darker than the surface."""
    size = region.shape[0]
    step = 1.5 / size  # one pixel and a half per step, whatever the image's size
    start, heading = _pick_point(rng, region), rng.uniform(0, 2 * np.pi)
    walks = [(start, heading, int(rng.uniform(30, 150) / 1.5), rng.uniform(0.5, 1.5), 0)]
    alpha = np.zeros_like(region)
    while walks:
        position, heading, steps, halfwidth, depth = walks.pop()
        points = [position]
        for _ in range(max(steps, 2)):
            heading += rng.normal(0.0, 0.25)
            position = position + step * np.array([np.cos(heading), np.sin(heading)])
            points.append(position)
            if depth < 1 and rng.random() < 0.03:
                turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
                walks.append((position, heading + turn, steps // 2, max(halfwidth * 0.7, 0.5), depth + 1))
        taper = np.linspace(1.0, 0.5, len(points) - 1)
        alpha = np.maximum(alpha, _stroke(np.array(points), (halfwidth * taper).astype(np.float32), size))
    alpha = alpha * region
    return image - rng.uniform(0.08, 0.22) * alpha[..., None], alpha


def _pit(rng: np.random.Generator, image: np.ndarray, region: np.ndarray):
    """A small pit or blowhole: an irregular dark spot of 2-7 px radius, 10-30% of the full scale darker."""
    size = region.shape[0]
    x, y = _coords(size)
    centre, radius = _pick_point(rng, region), rng.uniform(2.0, 7.0) / size
    theta = np.arctan2(y - centre[1], x - centre[0])
    wobble = sum(rng.normal(0, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
    distance = np.hypot(x - centre[0], y - centre[1]) / (radius * (1 + wobble))
    alpha = np.clip((1.0 - distance) / 0.4, 0.0, 1.0) * region
    return image - rng.uniform(0.1, 0.3) * alpha[..., None], alpha


def _faint_stain(rng: np.random.Generator, image: np.ndarray, region: np.ndarray):
    """A faint blotch with a noisy outline, 4-12% of the full scale brighter or darker; no colour of its own."""
    size = region.shape[0]
    x, y = _coords(size)
    centre, radius = _pick_point(rng, region), rng.uniform(0.03, 0.1)
    wobble = _smooth_noise(rng, (12, 12), size)
    blob = 1 - (np.hypot(x - centre[0], y - centre[1]) / radius) ** 2 + 0.35 * wobble
    alpha = np.clip(blob / 0.3, 0.0, 1.0) * region
    return image + rng.uniform(0.04, 0.12) * rng.choice([-1.0, 1.0]) * alpha[..., None], alpha


def _faint_shading(rng: np.random.Generator, image: np.ndarray, region: np.ndarray):
    """Uneven shading at low contrast: a large patch 3-10% of the full scale brighter or darker."""
    size = region.shape[0]
    x, y = _coords(size)
    centre, radius = _pick_point(rng, region, margin=0.15), rng.uniform(0.12, 0.3)
    wobble = _smooth_noise(rng, (6, 6), size)
    distance = np.hypot(x - centre[0], y - centre[1]) / radius + 0.25 * wobble
    alpha = np.clip((1.0 - distance) / 0.1, 0.0, 1.0) * region
    return image + rng.uniform(0.03, 0.1) * rng.choice([-1.0, 1.0]) * alpha[..., None], alpha


def _fine_scratch(rng: np.random.Generator, image: np.ndarray, region: np.ndarray):
    """A hairline scratch: a slightly curved line 1-2 px wide, 5-16% of the full scale brighter or darker."""
    size = region.shape[0]
    centre, length, angle = _pick_point(rng, region), rng.uniform(0.05, 0.25), rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    control = centre + np.array([-direction[1], direction[0]]) * rng.normal(0.0, 0.2) * length
    t = np.linspace(0.0, 1.0, 48)[:, None]
    start, end = centre - direction * length / 2, centre + direction * length / 2
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    mid = (t[1:, 0] + t[:-1, 0]) / 2
    halfwidth = rng.uniform(0.5, 1.0) * np.sin(np.pi * mid) ** 0.3
    alpha = _stroke(points, np.maximum(halfwidth, 0.3).astype(np.float32), size) * region
    return image + rng.uniform(0.05, 0.16) * rng.choice([-1.0, 1.0]) * alpha[..., None], alpha


_SURFACE_DRAWERS = {
    "scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "shading": _shading,
    "fine_crack": _fine_crack, "pit": _pit, "faint_stain": _faint_stain, "faint_shading": _faint_shading,
    "fine_scratch": _fine_scratch,
}


# ----------------------------------------------------------------------------- public API


def _check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; a clear ValueError otherwise (bools rejected)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def _check_category(category: str) -> str:
    if category not in _RENDERERS:
        valid = ", ".join(CATEGORIES)
        raise ValueError(f"unknown synthetic category {category!r}; valid categories: {valid}")
    return category


def _generator(seed: int, category: str, folder: str, index: int, stream: int) -> np.random.Generator:
    """A generator keyed by (seed, category, folder, index, stream); crc32 keeps names stable across runs."""
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(folder.encode()), index, stream]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def generate_pair(
    category: str, index: int, defect: str, size: int = DEFAULT_SIZE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test image ``index`` of a defect type, as (clean, defective, mask) before and after the defect.

    ``clean`` and ``defective`` are uint8, (H, W) for grayscale categories or (H, W, 3); ``mask`` is (H, W)
    bool, and ``clean == defective`` everywhere outside it.
    """
    _check_category(category)
    if defect not in DEFECT_TYPES[category]:
        raise ValueError(
            f"unknown defect {defect!r} for synthetic category {category!r}; "
            f"valid defects: {', '.join(DEFECT_TYPES[category])}"
        )
    clean_f, defective_f, alpha, finish = _render(category, index, defect, size, seed)
    mask = alpha > _DRAW_ALPHA
    clean = finish(clean_f)
    defective = np.where(mask[..., None] if clean.ndim == 3 else mask, finish(defective_f), clean)
    return clean, defective, mask


def draw_surface_defect(image: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one surface defect (one of ``SURFACE_DEFECTS`` or the low-contrast ``SUBTLE_DEFECTS``) on any image.

    ``image`` is (H, W, 3) float in [0, 1], e.g. a real defect-free photograph; returns the defective copy and
    its (H, W) bool mask, the pixels the defect changed. A non-square image is drawn on as the corner of a
    square canvas of its longer side (defect sizes are relative to that side) and cropped back. Used to
    validate settings without test labels.
    """
    if defect not in _SURFACE_DRAWERS:
        raise ValueError(f"unknown surface defect {defect!r}; valid: {', '.join(_SURFACE_DRAWERS)}")
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"draw_surface_defect needs an (H, W, 3) image of at least 8x8 pixels, got {image.shape}")
    draw = _SURFACE_DRAWERS[defect]
    height, width = image.shape[:2]
    side = max(height, width)
    canvas = np.pad(image.astype(np.float32), ((0, side - height), (0, side - width), (0, 0)), mode="edge")
    region = np.zeros((side, side), np.float32)
    region[:height, :width] = 1.0
    drawn, alpha = draw(rng, canvas, region)
    drawn, alpha = drawn[:height, :width], alpha[:height, :width]
    mask = alpha > _DRAW_ALPHA
    return np.where(mask[..., None], np.clip(drawn, 0.0, 1.0), image).astype(np.float32), mask


def generate_image(
    category: str,
    index: int,
    defect: str | None = None,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    split: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask, exactly as :func:`make_synthetic_dataset` writes it.

    ``defect=None`` gives a defect-free image of ``split`` ("train", the default, or "test") with an empty
    mask; a defect type (see ``DEFECT_TYPES[category]``) gives test image ``index`` of that defect. Images are
    uint8, (H, W) for grayscale categories (``IMAGE_MODES``) and (H, W, 3) otherwise; masks are (H, W) bool.
    """
    _check_category(category)
    if defect is not None:
        if split not in (None, "test"):
            raise ValueError(f"defect images belong to the 'test' split, got split={split!r}")
        _, image, mask = generate_pair(category, index, defect, size, seed)
        return image, mask
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = "train" if split in (None, "train") else "test/good"
    clean_f, _, _, finish = _render(category, index, None, size, seed, folder)
    return finish(clean_f), np.zeros((size, size), dtype=bool)


def _render(category: str, index: int, defect: str | None, size: int, seed: int, folder: str | None = None):
    """Clean and defective float renderings, the defect's coverage, and the shared lighting/noise finish."""
    index = _check_int("index", index, 0)
    size = _check_int("size", size, MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    folder = folder or f"test/{defect}"
    rng = _generator(seed, category, folder, index, 0)
    scene = _RENDERERS[category](rng, size)
    clean = _compose(scene)
    # Lighting and sensor noise are drawn once and applied to both renderings, so they agree off the defect.
    x, y = _coords(size)
    gx, gy = rng.uniform(-0.08, 0.08, 2)
    gain = (rng.uniform(0.92, 1.08) * (1.0 + gx * (x - 0.5) + gy * (y - 0.5)))[..., None]
    noise = rng.normal(0.0, rng.uniform(0.008, 0.02), clean.shape).astype(np.float32)

    def finish(image: np.ndarray) -> np.ndarray:
        out = np.rint(np.clip(image * gain + noise, 0.0, 1.0) * 255.0).astype(np.uint8)
        return out[..., 0] if out.shape[-1] == 1 else out

    if defect is None:
        return clean, clean, np.zeros((size, size), np.float32), finish
    defect_rng = _generator(seed, category, folder, index, 1)
    min_pixels = max(3, round(2e-4 * size * size))
    for _ in range(20):  # redraw the rare defect that lands (almost) off the surface
        if defect == "missing_part":
            defective, alpha = _missing_part(defect_rng, scene)
        elif defect == "misplaced_part":
            defective, alpha = _misplaced_part(defect_rng, scene)
        else:
            defective, alpha = _SURFACE_DRAWERS[defect](defect_rng, clean, scene.region)
        if int((alpha > _DRAW_ALPHA).sum()) >= min_pixels:
            return clean, np.clip(defective, 0.0, 1.0), alpha, finish
    raise RuntimeError(f"synthetic generator: could not place a visible {defect} on {category} image {index}")


def _save(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _write_category(
    target: Path, category: str, n_train: int, n_test_good: int, n_test_per_defect: int, size: int, seed: int
) -> None:
    """Write one category into a temporary folder next to ``target``, then move it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.", suffix=".tmp", dir=target.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        folders = {"train/good": n_train, "test/good": n_test_good}
        folders.update({f"test/{d}": n_test_per_defect for d in DEFECT_TYPES[category]})
        for folder, count in folders.items():
            (tmp / folder).mkdir(parents=True)
            defect = folder.split("/")[1]
            if defect != GOOD:
                (tmp / "ground_truth" / defect).mkdir(parents=True)
            for i in range(count):
                if defect == GOOD:
                    image, _ = generate_image(category, i, None, size, seed, folder.split("/")[0])
                else:
                    image, mask = generate_image(category, i, defect, size, seed)
                    _save(mask.astype(np.uint8) * 255, tmp / "ground_truth" / defect / f"{i:03d}_mask.png")
                _save(image, tmp / folder / f"{i:03d}.png")
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def make_synthetic_dataset(
    root: str | Path,
    categories: str | Sequence[str] | None = None,
    n_train: int = DEFAULT_N_TRAIN,
    n_test_good: int = DEFAULT_N_TEST_GOOD,
    n_test_per_defect: int = DEFAULT_N_TEST_PER_DEFECT,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic data set in MVTec AD layout under ``root`` and return ``root``.

    Defaults (all six categories, 60 train, 20 good test, 10 test per defect, 256 px) make a demo of 720
    images and 240 masks. Each category is written to a temporary folder and renamed into place, so a
    category folder is either complete or absent. An existing non-empty category folder is an error unless
    ``overwrite=True``.
    """
    n_train = _check_int("n_train", n_train, 1)
    n_test_good = _check_int("n_test_good", n_test_good, 1)
    n_test_per_defect = _check_int("n_test_per_defect", n_test_per_defect, 1)
    size = _check_int("size", size, MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    if categories is None:
        chosen = CATEGORIES
    else:
        chosen = (categories,) if isinstance(categories, str) else tuple(dict.fromkeys(categories))
        if not chosen:
            raise ValueError(f"categories must name at least one of: {', '.join(CATEGORIES)}")
        for category in chosen:
            _check_category(category)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"synthetic data set root {root} exists and is not a folder")
    for category in chosen:
        target = root / category
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a folder")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise FileExistsError(
                f"synthetic category folder {target} already exists and is not empty; "
                "pass overwrite=True to replace it"
            )
    root.mkdir(parents=True, exist_ok=True)
    for category in chosen:
        _write_category(root / category, category, n_train, n_test_good, n_test_per_defect, size, seed)
    return root
