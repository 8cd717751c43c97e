"""``metaad serve`` as a user meets it: a real server process on 127.0.0.1, a real HTTP client."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import metaad  # noqa: F401  (before torch: OpenMP threads wait passively)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _texture(n: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    pattern = 0.5 + 0.2 * torch.sin(xs / 3.0) * torch.cos(ys / 4.0)
    return (pattern.expand(n, 3, 64, 64) + 0.02 * torch.randn(n, 3, 64, 64, generator=generator)).clamp(0, 1)


def make_run(folder, model_name: str = "patchcore"):
    """A run folder as 'metaad fit' writes it, for a tiny model fitted on random textures."""
    from metaad.io import write_json
    from metaad.models import create_model, get_config
    from metaad.models.persistence import save_model

    model = create_model(model_name, "tiny").fit(_texture(12, 0)).eval()
    save_model(model, folder / "model")
    good = model.predict(_texture(4, 1)).scores
    threshold = float(good.max()) * 1.05
    write_json(folder / "config.json", {"model": model_name, "params": get_config(model), "image_size": 64})
    write_json(folder / "threshold.json", {"threshold": threshold, "score_low": float(good.min())})
    write_json(folder / "metrics.json", {"image_auroc": 1.0, "pro": 0.9, "n_images": 8})
    return folder


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"))
    port = _free_port()
    log = open(run / "serve.log", "w+")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "metaad.cli.main", "serve", "--run", str(run), "--port", str(port), "--threads", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log.seek(0)
            pytest.fail(f"metaad serve did not come up:\n{log.read()}")
        time.sleep(0.3)
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client, run
    process.terminate()
    try:
        process.wait(timeout=15)
    finally:
        process.kill()
        log.close()


def _image(defect: bool = False) -> bytes:
    image = (_texture(1, 2)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if defect:
        image[20:36, 24:40] = (242, 25, 25)
    return _png(image)


def test_health_model_and_docs(server):
    client, run = server
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/model").json()
    threshold = json.loads((run / "threshold.json").read_text())["threshold"]
    assert info["method"] == "patchcore" and info["image_size"] == 64
    assert info["threshold"] == pytest.approx(threshold) and info["metrics"]["image_auroc"] == 1.0
    assert client.get("/docs").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_scores_and_decides(server):
    client, _ = server
    good = client.post("/predict", files={"image": ("good.png", _image(), "image/png")}).json()
    bad = client.post("/predict", files={"image": ("bad.png", _image(True), "image/png")}).json()
    assert good["decision"] == "good" and bad["decision"] == "anomalous"
    assert bad["score"] > bad["threshold"] > good["score"]
    assert good["heatmap"] is None and good["overlay"] is None
    assert (good["width"], good["height"]) == (64, 64)


def test_heatmap_and_overlay_come_as_png(server):
    client, _ = server
    # a JPEG at another size: the maps come back at the image's own size
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_image(True))).resize((100, 80)).save(buffer, format="JPEG")
    answer = client.post(
        "/predict", params={"heatmap": "true", "overlay": "true"}, files={"image": ("x.jpg", buffer.getvalue())}
    ).json()
    for key in ("heatmap", "overlay"):
        picture = Image.open(io.BytesIO(base64.b64decode(answer[key])))
        assert picture.format == "PNG" and picture.size == (100, 80) and picture.mode == "RGB"
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["heatmap"]))))
    assert heat[28 * 80 // 64, 32 * 100 // 64, 0] > heat[2, 2, 0]  # red on the defect, blue in a good corner
    assert len(answer["heatmap_range"]) == 2


@pytest.mark.parametrize(
    ("files", "status", "words"),
    [
        ({"image": ("notes.txt", b"hello, not an image", "text/plain")}, 400, "not an image"),
        ({"image": ("cut.png", _image()[:200], "image/png")}, 400, "truncated"),
        ({"image": ("empty.png", b"", "image/png")}, 400, "empty"),
        ({"picture": ("good.png", _image(), "image/png")}, 422, "image"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(server, files, status, words):
    client, _ = server
    answer = client.post("/predict", files=files)
    assert answer.status_code == status, answer.text
    assert words in json.dumps(answer.json()["detail"])
    assert "object at 0x" not in answer.text and "BytesIO" not in answer.text  # no Python internals
    assert client.post("/predict", files={"image": ("good.png", _image())}).status_code == 200  # still serving


def test_too_large_uploads_are_refused(server):
    client, _ = server
    answer = client.post("/predict", files={"image": ("big.png", b"\0" * (21 * 1024 * 1024))})
    assert answer.status_code == 413 and "larger than" in answer.json()["detail"]
    bomb = _png(np.zeros((7000, 7000), dtype=np.uint8))  # 49 Mpx in a small file
    answer = client.post("/predict", files={"image": ("bomb.png", bomb)})
    assert answer.status_code == 413 and "pixels" in answer.json()["detail"]
    assert client.post("/predict", data={"image": "text"}).status_code == 422
    assert client.get("/health").status_code == 200


def test_the_normalized_score_keeps_order_beyond_both_ends(tmp_path):
    from metaad.deploy.inference import Run

    run = Run(make_run(tmp_path / "run"))
    threshold, low = run.threshold, run.thresholds["score_low"]
    assert run.normalize(threshold) == pytest.approx(0.5) and run.normalize(low) == pytest.approx(0.0)
    far = [run.normalize(threshold + k * (threshold - low)) for k in (2, 5, 50)]
    assert far == sorted(far) and far[0] > 1 and len(set(far)) == 3  # no saturation at 1
    assert run.normalize(low - (threshold - low)) < 0


def test_the_docs_page_is_self_contained_and_describes_every_endpoint(server, tmp_path):
    import re

    client, _ = server
    answer = client.get("/docs")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    page = answer.text
    assert "<script" not in page and "cdn" not in page.lower()
    links = re.findall(r"(?:src|href)=['\"]?([^'\" >]+)", page)
    assert all(not link.startswith(("http:", "https:", "//")) for link in links), links
    for endpoint in ("/predict", "/health", "/model"):
        assert f"<span class=path>{endpoint}</span>" in page
    assert "heatmap" in page and "category" in page and "image" in page  # /predict's parameters
    from test_html_report import _chromium, screenshot

    if _chromium() is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's package)")
    (tmp_path / "docs.html").write_text(page)
    log = screenshot(tmp_path / "docs.html", tmp_path / "docs.png", tmp_path)
    assert not [line for line in log.splitlines() if "net::ERR" in line or "Failed to load resource" in line]
    image = np.asarray(Image.open(tmp_path / "docs.png").convert("RGB"))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # text on the page, not blank
