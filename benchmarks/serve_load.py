"""Load on ``metaad serve`` over loopback: N concurrent clients, throughput, p50/p99 latency, errors, server RSS.

Starts ``metaad serve --run RUN`` on 127.0.0.1, waits for /health, then ``--clients`` threads each with its own
HTTP connection post test images (Magnetic Tile Defects test split, or synthetic tiles without the data) to
/predict until ``--requests`` are answered, every ``--heatmap-every``-th with heat map and overlay. The server's
resident memory is read from /proc every ``--rss-every`` requests; flat means it stops growing after warm-up.
Bounded: a fixed number of requests, a timeout per request, the server stopped at the end.
"""

import argparse
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common import REPO, SHARED_DATA, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default=str(REPO / "benchmarks" / "_work" / "mtd_patchcore_exact_export"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--heatmap-every", type=int, default=10)
    parser.add_argument("--rss-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="the server's CPU threads")
    args = parser.parse_args()
    bodies = _images(16)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(Path(args.run) / "serve_load_server.log", "w")  # noqa: SIM115 (closed at the end)
    server = subprocess.Popen(
        [sys.executable, "-m", "metaad.cli.main", "serve", "--run", args.run, "--port", str(port),
         "--threads", str(args.threads)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        startup = _wait(base, server)
        latencies: list[float] = []
        errors: list[str] = []
        rss: list[tuple[int, float]] = [(0, _rss_mb(server.pid))]
        lock = threading.Lock()
        issued = iter(range(args.requests))

        def client() -> None:
            with httpx.Client(base_url=base, timeout=120) as http:
                while True:
                    with lock:
                        n = next(issued, None)
                    if n is None:
                        return
                    params = {"heatmap": "true", "overlay": "true"} if n % args.heatmap_every == 0 else None
                    tic = time.perf_counter()
                    try:
                        answer = http.post("/predict", params=params, files={"image": ("t.png", bodies[n % 16])})
                        ok = answer.status_code == 200 and "score" in answer.json()
                        problem = None if ok else f"{answer.status_code}: {answer.text[:200]}"
                    except httpx.HTTPError as error:
                        problem = repr(error)
                    with lock:
                        latencies.append(time.perf_counter() - tic)
                        if problem:
                            errors.append(problem)
                        if len(latencies) % args.rss_every == 0:
                            rss.append((len(latencies), _rss_mb(server.pid)))

        tic = time.perf_counter()
        workers = [threading.Thread(target=client) for _ in range(args.clients)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds = time.perf_counter() - tic
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    ms = np.array(latencies) * 1000
    after_warmup = [mb for n, mb in rss if n >= min(100, args.requests // 2)]
    results = {
        "run": os.path.relpath(args.run, REPO),
        "clients": args.clients,
        "requests": len(latencies),
        "server_threads": args.threads,
        "errors": len(errors),
        "first_errors": errors[:5],
        "startup_seconds": startup,
        "seconds": seconds,
        "requests_per_second": len(latencies) / seconds,
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                       "max": float(ms.max())},
        "rss_mb": {"start": rss[0][1], "after_warmup": after_warmup[0], "end": rss[-1][1],
                   "growth_after_warmup": rss[-1][1] - after_warmup[0], "samples": rss},
        "heatmap_every": args.heatmap_every,
        "image_bytes_mean": float(np.mean([len(b) for b in bodies])),
    }
    print({k: v for k, v in results.items() if k != "rss_mb"}, results["rss_mb"]["growth_after_warmup"])
    record(f"serve_load_{args.clients}clients", results)


def _images(n: int) -> list[bytes]:
    """PNG bodies: Magnetic Tile Defects test images when the data is there, else seeded noise tiles."""
    files = sorted((SHARED_DATA / "mtd").glob("MT_*/Imgs/*.jpg"))[::37][:n] if (SHARED_DATA / "mtd").is_dir() else []
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(n):
        image = Image.open(files[i]).convert("RGB") if i < len(files) else Image.fromarray(
            rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
        )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    return bodies


def _wait(base: str, server: subprocess.Popen, limit: float = 300) -> float:
    tic = time.perf_counter()
    while time.perf_counter() - tic < limit:
        if server.poll() is not None:
            raise SystemExit(f"metaad serve exited with {server.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - tic
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit("metaad serve did not come up")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
