"""Export a fitted model to one ONNX graph: [0, 1] RGB images (B, 3, S, S) at the run's size -> scores (B,) and
maps (B, S, S), with normalisation, backbone, scorer, smoothing and upsampling inside; resizing is the caller's.

One generic path for every registered method: a thin module calling the model's ``export_forward`` (``metaad.types``:
``predict``'s computation for one batch; PatchCore's faiss search becomes an exact search of matrix products and
minima), traced by torch's TorchScript exporter at opset 18. Everything a caller needs (size,
method, threshold, metrics, metaad version) goes into the graph's ``metadata_props``; every export is checked
against metaad on three images (traced on two, so the batch size is free) before it is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metaad import runtime
from metaad.data.tiles import Tiling
from metaad.device import select_device
from metaad.io import atomic_write
from metaad.models import get_config, registered_name
from metaad.models.persistence import load_model
from metaad.runs.layout import read_config, read_metrics, read_threshold, read_thresholds, run_image_size

OPSET = 18
INPUT, OUTPUTS = "images", ("scores", "maps")


class ExportWrapper(nn.Module):
    """(B, 3, S, S) images in [0, 1] -> (scores (B,), maps (B, S, S)), float32, through the model's export path.

    With ``tiling`` (a run fitted on tiles), the graph cuts each image into the run's tiles, scores them as one
    batch and blends their maps as :class:`metaad.runs.scoring.Scorer` does: the tiles' places are fixed by the
    run's size, so they are constants of the graph."""

    def __init__(self, model: nn.Module, tiling: Tiling | None = None, image_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.boxes = None if tiling is None else tiling.boxes(image_size, image_size)
        if self.boxes is not None:
            count = torch.zeros(image_size, image_size)
            for y, x, h, w in self.boxes:
                count[y : y + h, x : x + w] += 1
            self.register_buffer("tile_count", count, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.boxes is None:
            scores, maps = self.model.export_forward(images)
            return scores.float(), maps.float()
        _, _, height, width = images.shape
        _, _, tile_h, tile_w = self.boxes[0]  # every tile of a square image has one size
        crops = torch.stack([images[:, :, y : y + h, x : x + w] for y, x, h, w in self.boxes], dim=1)
        scores, maps = self.model.export_forward(crops.reshape(-1, 3, tile_h, tile_w))
        n = len(self.boxes)
        maps = maps.float()
        if tuple(maps.shape[-2:]) != (tile_h, tile_w):
            maps = nn.functional.interpolate(maps[:, None], size=(tile_h, tile_w), mode="bilinear")[:, 0]
        maps = maps.reshape(-1, n, tile_h, tile_w)
        total = sum(
            nn.functional.pad(maps[:, i], (x, width - x - w, y, height - y - h))
            for i, (y, x, h, w) in enumerate(self.boxes)
        )
        return scores.float().reshape(-1, n).amax(1), total / self.tile_count


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: int,
    metadata: dict[str, Any] | None = None,
    device: str = "cpu",
    check_images: torch.Tensor | None = None,
    tiling: Tiling | None = None,
) -> dict[str, Any]:
    """Write ``model`` as ONNX to ``path`` for (B, 3, image_size, image_size) inputs; returns the export check
    (largest score and map differences between onnxruntime and the eager export path on ``check_images``,
    by default three seeded noise images, and the batch size the graph takes).

    The graph is traced on two images with a free batch size; a method whose tensor code fixes the batch it
    was traced with (the check on three images fails) is exported for one image at a time instead
    (``metadata_props["batch"]`` is then "1"; :func:`run_onnx` loops)."""
    _register_symbolics()
    target = select_device(device)
    wrapper = ExportWrapper(model.eval(), tiling, image_size).to(target).eval()
    if check_images is None:
        generator = torch.Generator().manual_seed(0)
        check_images = torch.rand(3, 3, image_size, image_size, generator=generator)
    with torch.inference_mode(), _exportable():
        expected = [t.cpu().numpy() for t in wrapper(check_images.to(target))]
    problems = []
    for batch in ("any", "1"):
        data = _trace(wrapper, check_images[: 2 if batch == "any" else 1].to(target), batch, metadata or {})
        try:
            scores, maps = run_onnx(onnx_session(data), check_images.numpy())
        except Exception as error:  # onnxruntime's errors have no common public base class
            problems.append(f"batch {batch}: {str(error)[:300]}")
            continue
        check = {
            "batch": batch,
            "max_relative_score_difference": float(
                np.max(np.abs(scores - expected[0]) / np.maximum(np.abs(expected[0]), 1e-12))
            ),
            "max_map_difference": float(np.max(np.abs(maps - expected[1]))),
        }
        if check["max_relative_score_difference"] < 1e-3 and maps.shape == expected[1].shape:
            atomic_write(Path(path), lambda tmp, data=data: tmp.write_bytes(data))
            return check
        problems.append(f"batch {batch}: {check}")
    raise RuntimeError(f"no ONNX graph reproduces {type(model).__name__}; nothing written ({'; '.join(problems)})")


def run_onnx(session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of (B, 3, S, S) float32 images, one at a time when the graph takes a batch of one."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if session.get_inputs()[0].shape[0] == 1 and len(images) != 1:
        parts = [session.run(None, {INPUT: images[i : i + 1]}) for i in range(len(images))]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    scores, maps = session.run(None, {INPUT: images})
    return scores, maps


def _trace(wrapper: ExportWrapper, example: torch.Tensor, batch: str, metadata: dict[str, Any]) -> bytes:
    import onnx

    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in (INPUT, *OUTPUTS)} if batch == "any" else None
    with _exportable(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values recorded as constants
        torch.onnx.export(
            wrapper, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=[INPUT],
            output_names=list(OUTPUTS), dynamic_axes=axes,
        )
    graph = onnx.load_from_string(buffer.getvalue())
    if batch == "any":
        _single_output_splits_to_identity(graph)
    graph.doc_string = "metaad anomaly model: images (B, 3, S, S) RGB in [0, 1] -> scores (B,), maps (B, S, S)"
    for key, value in {**metadata, "batch": batch}.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(graph)
    return graph.SerializeToString()


def export_run(run: str | Path, out: str | Path, device: str = "cpu") -> dict[str, str]:
    """Export a run folder's model with its threshold, size and metrics in the metadata; returns the metadata."""
    run = Path(run)
    model = load_model(run)
    image_size = run_image_size(run)
    metadata = run_metadata(model, image_size, read_threshold(run), read_metrics(run))
    config = read_config(run)
    tiling = Tiling.from_config(config.get("tiling"))
    if config.get("resize") == "pad":
        metadata["resize"] = "pad"
        metadata["input"] += ("; each image letterboxed: long side to the size, aspect kept, centred on black "
                              "(metaad.data.transforms.letterbox); crop the maps to the image's place")
    if tiling is not None:
        metadata["tiling"] = json.dumps(tiling.to_config())
        metadata["input"] += f"; tiled inside the graph into {tiling.tile} px tiles as the run was fitted"
    categories = read_thresholds(run).get("categories")
    if categories:  # a unified run: each category's thresholds beside the global one
        metadata["category_thresholds"] = json.dumps(
            {name: {"threshold": r["threshold"], "pixel_threshold": r.get("pixel_threshold")}
             for name, r in categories.items()}
        )
        metadata["decision"] += " (the image's category's threshold from category_thresholds, where known)"
    check = export_onnx(model, out, image_size, metadata, device, tiling=tiling)
    return {**metadata, "export_check": json.dumps(check)}


def run_metadata(
    model: nn.Module, image_size: int, threshold: float | None, metrics: dict[str, Any]
) -> dict[str, str]:
    """What an exported graph carries for its callers (all values strings; JSON where structured)."""
    params = get_config(model)
    summary = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}
    return {
        "metaad_version": runtime.__version__,
        "method": registered_name(model),
        "params": json.dumps(params),
        "image_size": str(image_size),
        "input": f"{INPUT}: float32 (B, 3, {image_size}, {image_size}) RGB in [0, 1], resized by the caller",
        "outputs": f"scores: (B,) higher = more anomalous; maps: (B, {image_size}, {image_size})",
        "threshold": "" if threshold is None else repr(float(threshold)),
        "decision": "anomalous when score > threshold",
        "metrics": json.dumps(summary),
    }


def onnx_session(model: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session (``threads`` intra-op threads; default: onnxruntime's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _exportable() -> Iterator[None]:
    """nn.Transformer's fused inference kernel has no ONNX form: trace the plain one."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _register_symbolics() -> None:
    """ONNX forms the TorchScript exporter lacks: antialiased bilinear resizing (a method's own downsampling;
    opset 18's Resize with ``antialias`` and ``exclude_outside`` computes what torch does) and ``lift_fresh``
    (a ``torch.tensor`` constant inside a traced method, which is the constant itself)."""
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v", "is", "b", "none")
    def antialiased_bilinear(g, images, output_size, align_corners, scale_factors):
        batch_channels = g.op(
            "Slice", g.op("Shape", images), g.op("Constant", value_t=torch.tensor([0])),
            g.op("Constant", value_t=torch.tensor([2])),
        )
        sizes = g.op("Concat", batch_channels, g.op("Constant", value_t=torch.tensor(output_size)), axis_i=0)
        empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
        return g.op(
            "Resize", images, empty, empty, sizes, mode_s="linear", antialias_i=1, exclude_outside_i=1,
            coordinate_transformation_mode_s="align_corners" if align_corners else "half_pixel",
        )

    register_custom_op_symbolic("aten::_upsample_bilinear2d_aa", antialiased_bilinear, OPSET)
    register_custom_op_symbolic("aten::lift_fresh", lambda g, tensor: tensor, OPSET)


def _single_output_splits_to_identity(graph) -> None:
    """A method's ``images.split(batch_size)`` loop traces to a Split with one output, fixed to the traced batch;
    a Split with one output is the identity, and replacing it keeps the batch dimension free."""
    for node in graph.graph.node:
        if node.op_type == "Split" and len(node.output) == 1:
            node.op_type = "Identity"
            del node.input[1:]
            del node.attribute[:]
