"""An HTTP service for one fitted run: FastAPI on uvicorn (``pip install "metaad[serve]"``), the model loaded once.

``POST /predict`` (multipart field ``image``) -> JSON score, decision and threshold, and on request
(``?heatmap=true&overlay=true``) the heat map and its overlay on the image as base64 PNG; ``GET /health``;
``GET /model`` (method, size, threshold, metrics); the API described at ``/docs`` (a page rendered here, no
script or CDN: it shows offline) and ``/openapi.json``. A bad upload (not an image, truncated,
empty, too large, wrong field) is a 4xx with a message, never a 500, and the service goes on serving.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from metaad import runtime
from metaad.deploy.api_page import api_page
from metaad.deploy.inference import Run
from metaad.device import select_device
from metaad.runs.layout import read_metrics
from metaad.runs.rendering import heat_colours, map_scale
from metaad.runs.rendering import overlay as draw_overlay

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # decoded size limit: a small file can hold a huge image (decompression bomb)


class RegionInfo(BaseModel):
    area: int  # pixels
    x: int  # bounding box in the image's pixels: left, top, width, height
    y: int
    width: int
    height: int
    peak: float  # highest anomaly-map value inside


class Prediction(BaseModel):
    score: float
    decision: str | None  # "anomalous" or "good"; None when the run has no threshold
    anomalous: bool | None
    threshold: float | None
    normalized_score: float | None  # the threshold at 0.5, the lowest held-out good score at 0; unclipped
    category: str | None = None  # whose threshold decided (a run of several categories)
    note: str | None = None  # e.g. that the global threshold decided because no category was named
    width: int
    height: int
    milliseconds: float
    regions: list[RegionInfo] | None = None  # predicted defect regions (None: the run has no pixel threshold)
    heatmap_range: list[float] | None = None  # map values at the colour scale's ends
    heatmap: str | None = None  # base64 PNG, jet colours, the image's size
    mask: str | None = None  # base64 PNG, predicted defect pixels white (runs with a pixel threshold)
    overlay: str | None = None  # base64 PNG, heat map laid over the image


class ModelInfo(BaseModel):
    method: str
    image_size: int
    tiling: dict[str, Any] | None = None  # a run fitted on tiles: every image is scored through them
    threshold: float | None
    categories: list[str] = []  # categories with thresholds of their own (a run of several categories)
    metaad_version: str
    device: str
    params: dict[str, Any]
    metrics: dict[str, Any]


def create_app(run: str | Path, device: str = "cpu", max_upload_bytes: int = MAX_UPLOAD_BYTES,
               category: str | None = None, min_region_area: int = 1) -> FastAPI:
    """The service for run folder ``run`` (model loaded now, once). ``category``: whose thresholds decide
    by default in a run of several categories (a request's ``category`` form field picks another)."""
    run = Path(run)
    loaded = Run(run, device=device, category=category, min_region_area=min_region_area)
    target = select_device(device)
    metrics = read_metrics(run)
    info = ModelInfo(
        method=loaded.config.get("model", type(loaded.model).__name__),
        image_size=loaded.image_size,
        tiling=None if loaded.tiling is None else loaded.tiling.to_config(),
        threshold=loaded.threshold,
        categories=loaded.categories,
        metaad_version=runtime.__version__,
        device=str(target),
        params=loaded.config.get("params", {}),
        metrics={k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None},
    )
    lock = threading.Lock()  # one prediction at a time: the model and its search caches are not thread-safe
    app = FastAPI(
        title="metaad",
        version=runtime.__version__,
        description=f"Anomaly detection with the {info.method} run {run.name}: upload an image, get its score.",
        docs_url=None,  # Swagger UI loads from a CDN: /docs is a page rendered here instead (works offline)
        redoc_url=None,
    )

    @app.middleware("http")
    async def limit_upload(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes + 64 * 1024:
            return JSONResponse({"detail": f"upload larger than {max_upload_bytes} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(api_page(app.openapi()))

    @app.get("/health")
    def health() -> dict[str, str]:
        """Whether the service is up: {"status": "ok"}."""
        return {"status": "ok"}

    @app.get("/model", response_model=ModelInfo)
    def model_info() -> ModelInfo:
        """The run behind the service: method, image size, threshold(s), settings and test metrics."""
        return info

    @app.post("/predict", response_model=Prediction, response_model_exclude_none=False)
    def predict(
        image: Annotated[UploadFile, File(description="an image file: PNG, JPEG, BMP, TIFF, ...")],
        heatmap: Annotated[bool, Query(description="include the heat map (base64 PNG)")] = False,
        overlay: Annotated[bool, Query(description="include the heat map over the image, the predicted defect "
                                                   "outlined (base64 PNG, what 'metaad predict' writes)")] = False,
        mask: Annotated[bool, Query(description="include the predicted defect mask (base64 PNG)")] = False,
        category: Annotated[str | None, Form(description="whose threshold decides (a run of several categories)")]
        = None,
    ) -> Prediction:
        """Score one uploaded image: its score, the decision at the run's threshold (a category's, when named),
        and on request the heat map and its overlay on the image as base64 PNG."""
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
        pil = decode_image(data, image.filename or "upload")
        tic = time.perf_counter()
        deciding = loaded if category is None else loaded.with_category(category)
        with lock:
            result = deciding.predict(pil)[0]
        answer = Prediction(
            score=result.score,
            decision=None if result.anomalous is None else ("anomalous" if result.anomalous else "good"),
            anomalous=result.anomalous,
            threshold=deciding.threshold,
            normalized_score=result.normalized_score,
            category=deciding.category if deciding.thresholds is not deciding.run_thresholds else None,
            note=deciding.note,
            regions=None if result.regions is None else [RegionInfo(**r.as_dict()) for r in result.regions],
            width=result.size[0],
            height=result.size[1],
            milliseconds=1000 * (time.perf_counter() - tic),
        )
        if heatmap or overlay:  # the one rendering path of metaad.runs.rendering, predict's scale
            scale = deciding.colour_scale() or map_scale(result.map)
            answer.heatmap_range = list(scale)
            if heatmap:
                answer.heatmap = png_base64(heat_colours(result.map, scale))
            if overlay:
                answer.overlay = png_base64(draw_overlay(np.asarray(pil.convert("RGB")), result.map, scale,
                                                         result.mask))
        if mask and result.mask is not None:
            answer.mask = png_base64(result.mask.astype(np.uint8) * 255)
        return answer

    return app


def decode_image(data: bytes, name: str) -> Image.Image:
    """The uploaded bytes as a fully decoded PIL image; 400 (empty, not an image, truncated) or 413 (too many
    pixels) with a message otherwise."""
    if not data:
        raise HTTPException(400, f"{name}: empty upload; send an image file in the multipart field 'image'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = Image.open(io.BytesIO(data))
            if handle.width * handle.height > MAX_PIXELS:
                raise HTTPException(413, f"{name}: {handle.width}x{handle.height} px is over {MAX_PIXELS} pixels")
            handle.load()
    except HTTPException:
        raise
    except UnidentifiedImageError as error:  # its message names an in-memory buffer: not for the caller
        raise HTTPException(
            400, f"{name}: not an image file metaad can read (expected PNG, JPEG, BMP, TIFF, ...)"
        ) from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise HTTPException(400, f"{name}: unreadable or truncated image ({error})") from error
    return handle.convert("RGB") if handle.mode == "P" else handle  # as metaad.data.datasets.open_image


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          category: str | None = None, min_region_area: int = 1) -> None:
    """Run the service until interrupted."""
    import uvicorn

    app = create_app(run, device, category=category, min_region_area=min_region_area)
    uvicorn.run(app, host=host, port=port, log_level="info")
