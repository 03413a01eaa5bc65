"""Load on `miniclip serve` (a benchmark, not a test): concurrent classify requests (one image, three captions)
against a server it starts on 127.0.0.1 with the int8 ONNX model, bounded in requests and in time.

Reports requests/s, p50 and p99 latency, errors, and the server's resident memory (peak, and after the warm-up
against the end, to show growth). The target of issue `serve`: >= 50 requests/s with p99 < 200 ms at 8 clients
and no error or memory growth over 2,000 requests.

    python scripts/load_serve.py --model artifacts/runs/f30k            # the run must be exported: miniclip quantize
    python scripts/load_serve.py --model artifacts/runs/f30k --clients 8 --requests 2000 --json
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

CAPTIONS = ["a dog running on the grass", "a child playing in the water", "a man riding a bike"]
WARMUP = 50  # requests before timing starts: first calls build ONNX Runtime's kernels and caches


def multipart(image: bytes, name: str, captions=CAPTIONS) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n"]
    for caption in captions:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="captions"\r\n\r\n{caption}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def default_image() -> tuple[bytes, str]:
    """A 500 x 375 JPEG, the size of a Flickr photo, drawn here so the script needs no data."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (500, 375), (120, 160, 90))
    draw = ImageDraw.Draw(image)
    for k in range(40):
        draw.ellipse((k * 13 % 480, k * 29 % 350, k * 13 % 480 + 40, k * 29 % 350 + 30), fill=(k * 6, 90, 200 - k * 4))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue(), "load.jpg"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str, workers: int) -> tuple[subprocess.Popen, str, int]:
    command = [sys.executable, "-m", "miniclip_cli", "serve", "--model", model, "--backend", "onnx",
               "--host", "127.0.0.1", "--port", "0", "--workers", str(workers)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("miniclip serve: http://127.0.0.1:"):
        process.kill()
        sys.exit(f"the server did not start: {line!r} {process.stderr.read()}")
    port = int(line.rsplit(":", 1)[1])
    return process, "127.0.0.1", port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a run folder with RUN/onnx (miniclip quantize RUN)")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests, after the warm-up")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, each on a kept-alive connection")
    parser.add_argument("--max-seconds", type=float, default=180, help="stop sending after this long")
    parser.add_argument("--workers", type=int, default=2, help="the server's --workers")
    parser.add_argument("--vary-captions", action="store_true",
                        help="a new third caption each request, so the server's caption cache never answers")
    parser.add_argument("--image", type=Path, help="the image to send (default: a drawn 500x375 JPEG)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not 1 <= args.requests <= 100_000 or not 1 <= args.clients <= 64:
        sys.exit("--requests: 1 to 100000; --clients: 1 to 64")

    image, name = (args.image.read_bytes(), args.image.name) if args.image else default_image()
    body, content_type = multipart(image, name)
    process, host, port = start_server(args.model, args.workers)
    samples, latencies, errors, lock = [], [], [], threading.Lock()
    stop, sequence = threading.Event(), itertools.count()

    def watch_memory() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), rss_mb(process.pid)))
            time.sleep(0.1)

    def client(budget: dict, record: bool, deadline: float) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=30)
        while time.monotonic() < deadline:
            with lock:
                if budget["n"] <= 0:
                    break
                budget["n"] -= 1
                count = next(sequence)
            if args.vary_captions:  # "a man riding a bike 1234": a caption set the server has not seen
                request_body, request_type = multipart(image, name, [*CAPTIONS[:2], f"{CAPTIONS[2]} {count}"])
            else:
                request_body, request_type = body, content_type
            start = time.perf_counter()
            try:
                connection.request("POST", "/api/classify", request_body, {"Content-Type": request_type})
                response = connection.getresponse()
                payload = response.read()
                ok = response.status == 200 and len(json.loads(payload)["scores"]) == len(CAPTIONS)
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                ok, payload = False, repr(exc).encode()
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=30)
            elapsed = time.perf_counter() - start
            if record:
                with lock:
                    latencies.append(elapsed)
                    if not ok:
                        errors.append(payload[:200].decode(errors="replace"))
        connection.close()

    def run(n: int, record: bool, seconds: float) -> float:
        budget, deadline = {"n": n}, time.monotonic() + seconds
        threads = [threading.Thread(target=client, args=(budget, record, deadline)) for _ in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start

    try:
        run(WARMUP, False, 60)
        after_warmup = rss_mb(process.pid)
        watcher = threading.Thread(target=watch_memory, daemon=True)
        watcher.start()
        seconds = run(args.requests, True, args.max_seconds)
        stop.set()
        watcher.join()
        at_end = rss_mb(process.pid)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    ordered = sorted(latencies)

    def quantile(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    peak = max((mb for _, mb in samples), default=at_end)
    result = {"requests": len(latencies), "clients": args.clients, "server_workers": args.workers,
              "vary_captions": args.vary_captions,
              "seconds": round(seconds, 2), "requests_per_s": round(len(latencies) / seconds, 1),
              "p50_ms": round(quantile(0.50), 1), "p99_ms": round(quantile(0.99), 1),
              "max_ms": round(1000 * ordered[-1], 1) if ordered else None, "errors": len(errors),
              "rss_mb_after_warmup": round(after_warmup, 1), "rss_mb_end": round(at_end, 1),
              "rss_mb_peak": round(peak, 1), "cpus": os.cpu_count(), "image_bytes": len(image),
              "error_examples": errors[:3]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['requests']} requests, {args.clients} clients, server --workers {args.workers}, "
          f"{result['cpus']} CPUs{', captions varied' if args.vary_captions else ''}: {result['requests_per_s']} requests/s, p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms, max {result['max_ms']} ms, {result['errors']} errors; server RSS "
          f"{result['rss_mb_after_warmup']} MB after warm-up, {result['rss_mb_end']} MB at the end, "
          f"peak {result['rss_mb_peak']} MB")
    for example in result["error_examples"]:
        print("  error:", example)


if __name__ == "__main__":
    main()
