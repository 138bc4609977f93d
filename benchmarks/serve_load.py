"""Bounded load test for `okdpipe serve`: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients,
next to raw onnxruntime throughput at the batch sizes the server actually formed.

    python benchmarks/serve_load.py ARTIFACT_DIR                 # starts a server on a free loopback port
    python benchmarks/serve_load.py ARTIFACT_DIR --url http://127.0.0.1:8000 --api-key-file key

Every client sends a fixed number of one-image requests in the binary tensor encoding (as tritonclient does),
so "requests/s" is also images/s and compares directly with onnxruntime's images/s. Loopback only; a fixed
request count per level keeps the run bounded. Prints one JSON object, then a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from okdpipe.ortsession import create_session

READY_TIMEOUT_S = 60.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact_dir", type=Path, help="exported artifact (model.json + .onnx)")
    parser.add_argument("--url", help="a running server on loopback; default: start one")
    parser.add_argument("--api-key-file", type=Path, help="bearer token for a server started with one")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (both sides)")
    parser.add_argument("--server-args", default="", help="extra flags for the started server, one string")
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="time per raw onnxruntime measurement")
    return parser.parse_args()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def started_server(artifact_dir: Path, threads: int | None, extra: str):
    """`python -m okdpipe.serve` on a free loopback port, stopped with SIGTERM afterwards."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "okdpipe.serve",
        str(artifact_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra.split(),
    ]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def _wait_ready(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with status {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/v2/health/ready", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"server at {url} not ready after {READY_TIMEOUT_S} s")


def binary_request(image: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(image.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": image.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    )
    return header.encode() + image.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


class KeepAliveConnection:
    """A bare HTTP/1.1 keep-alive client on asyncio streams: a load generator must cost far less CPU than the
    server it measures (httpx spends ~2 ms of CPU per request, more than the server does, on a 2-core box)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> KeepAliveConnection:
        host, port = re.match(r"https?://([^:/]+):(\d+)", url).groups()
        return cls(*await asyncio.open_connection(host.strip("[]"), int(port)))

    async def post(self, raw_request: bytes) -> int:
        self.writer.write(raw_request)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return int(status_line.split()[1])

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def raw_post(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _client(url: str, raw_request: bytes, count: int, latencies: list[float]) -> int:
    connection = await KeepAliveConnection.open(url)
    await connection.post(raw_request)  # connection set up and first request out of the way before timing
    failures = 0
    for _ in range(count):
        started = time.perf_counter()
        failures += await connection.post(raw_request) != 200
        latencies.append(time.perf_counter() - started)
    await connection.close()
    return failures


async def run_level(url: str, raw_request: bytes, clients: int, total: int) -> dict:
    """`total` requests split over `clients` concurrent keep-alive connections; throughput and latency."""
    latencies: list[float] = []
    shares = [total // clients + (index < total % clients) for index in range(clients)]
    started = time.perf_counter()
    failures = await asyncio.gather(*(_client(url, raw_request, share, latencies) for share in shares))
    elapsed = time.perf_counter() - started
    latencies_ms = sorted(1000 * value for value in latencies)
    return {
        "clients": clients,
        "requests": total,
        "failures": sum(failures),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(total / elapsed, 1),
        "p50_ms": round(statistics.median(latencies_ms), 2),
        "p99_ms": round(latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))], 2),
    }


def batch_totals(url: str, auth: dict) -> tuple[float, float]:
    """(images run, model calls) so far, from the server's batch-size histogram."""
    text = httpx.get(url + "/metrics", headers=auth).text
    values = [
        float(re.search(rf"^okdpipe_batch_size_{kind} (\S+)$", text, re.MULTILINE).group(1))
        for kind in ("sum", "count")
    ]
    return values[0], values[1]


def raw_images_per_s(
    model_path: Path, input_name: str, shape: tuple, batch: int, threads: int | None, seconds: float
) -> float:
    """Plain onnxruntime, same model, same session options as the server (one factory), same batch size, no HTTP."""
    session, _ = create_session(model_path, threads=threads)
    feed = {input_name: np.random.default_rng(0).normal(size=(batch, *shape)).astype(np.float32)}
    session.run(None, feed)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feed)
        runs += 1
    return runs * batch / (time.perf_counter() - started)


def measure(url: str, args: argparse.Namespace, card: dict) -> list[dict]:
    auth = {"authorization": "Bearer " + args.api_key_file.read_text().strip()} if args.api_key_file else {}
    shape = tuple(card["input"]["shape"][1:])
    body, headers = binary_request(np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32))
    raw_request = raw_post(f"/v2/models/{card['name']}/infer", body, {**headers, **auth})
    rows = []
    for clients in args.concurrency:
        images_before, calls_before = batch_totals(url, auth)
        row = asyncio.run(run_level(url, raw_request, clients, args.requests))
        images_after, calls_after = batch_totals(url, auth)
        row["mean_batch"] = round((images_after - images_before) / max(calls_after - calls_before, 1), 2)
        batch = max(1, round(row["mean_batch"]))
        row["raw_ort_images_per_s"] = round(
            raw_images_per_s(
                args.artifact_dir / card["file"], card["input"]["name"], shape, batch, args.threads, args.raw_seconds
            ),
            1,
        )
        row["server_vs_raw"] = round(row["requests_per_s"] / row["raw_ort_images_per_s"], 3)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| clients | requests/s | p50 ms | p99 ms | mean batch | raw ORT img/s at that batch | server/raw |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} | "
        f"{r['raw_ort_images_per_s']} | {r['server_vs_raw']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    card = json.loads((args.artifact_dir / "model.json").read_text())
    if args.url:
        if not re.match(r"https?://(127\.0\.0\.1|localhost|\[::1\])[:/]", args.url + "/"):
            raise SystemExit("--url must be a loopback address: this load test never leaves the machine")
        rows = measure(args.url, args, card)
    else:
        with started_server(args.artifact_dir, args.threads, args.server_args) as url:
            rows = measure(url, args, card)
    print(
        json.dumps(
            {"model": card["name"], "threads": args.threads, "server_args": args.server_args, "results": rows}, indent=1
        )
    )
    print(markdown(rows))


if __name__ == "__main__":
    main()
