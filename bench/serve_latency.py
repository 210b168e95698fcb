"""Requests/s and latency percentiles of ``kitchen serve`` at 1, 4 and 16 concurrent clients.

    python bench/serve_latency.py [--concurrency 1 4 16] [--requests 48] [--max-tokens 16]

Builds the tiny test model (2-layer random Llama, ChatML tokenizer), saves a LoRA sampler checkpoint of
it with the local engine, and serves that sampler path with ``python -m kitchen.cli serve`` in its own
process (as a user would run it). Each level runs ``--concurrency`` clients that send chat completions
back to back until ``--requests`` have been answered; every request is greedy with exactly
``--max-tokens`` new tokens (the untrained tiny model never emits EOS at temperature 0), so levels do
the same work per request. Latency is from sending the request to the last byte of the response.
``batched`` is the server's mean requests per submission to the engine (``/health``): above 1 means
concurrent requests were generated together rather than one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sampler_path(workdir: Path) -> str:
    from kitchen.models.tiny import build_tiny_model
    from resources.local_engine import LocalServiceClient

    model = build_tiny_model(workdir / "tiny")
    service = LocalServiceClient(root=workdir / "engine", num_threads=1)
    trainer = service.create_lora_training_client(str(model), rank=4).result()
    return str(trainer.save_weights_for_sampler("bench").result().path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _level(url: str, model: str, clients: int, total: int, max_tokens: int) -> dict[str, float]:
    latencies: list[float] = []
    remaining = total

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            question = f"What is {index} + {remaining}?"
            body = {
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            assert response.json()["usage"]["completion_tokens"] == max_tokens

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        before = (await http.get(f"{url}/health")).json()["batching"]
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
        after = (await http.get(f"{url}/health")).json()["batching"]
    ordered = sorted(latencies)
    submissions = after["submissions"] - before["submissions"]
    return {
        "rps": len(latencies) / wall,
        "tokens_s": len(latencies) * max_tokens / wall,
        "p50": statistics.median(ordered) * 1000,
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000,
        "batched": (after["requests"] - before["requests"]) / max(submissions, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="requests per level (default 48)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server (OMP_NUM_THREADS; default 1: on a busy 2-core machine two "
        "intra-op threads wait on each other far longer than they compute)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kitchen-serve-bench-") as tmp:
        workdir = Path(tmp)
        path = _sampler_path(workdir)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "KITCHEN_HOME": str(workdir / "home")}
        env["OMP_NUM_THREADS"] = str(args.threads)
        env.pop("KITCHEN_SERVE_API_KEY", None)
        log = (workdir / "server.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "kitchen.cli", "serve", path, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        try:
            _wait(url, server, workdir / "server.log")
            asyncio.run(_level(url, path, 2, 8, args.max_tokens))  # warm-up
            rows: list[tuple[int, dict[str, Any]]] = []
            for clients in args.concurrency:
                measured = asyncio.run(_level(url, path, clients, args.requests, args.max_tokens))
                rows.append((clients, measured))
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
    print(
        f"kitchen serve, tiny model, {args.requests} requests per level, {args.max_tokens} new tokens each, "
        f"{args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print("| clients | requests/s | tokens/s | p50 ms | p95 ms | requests per engine submission |")
    print("|---:|---:|---:|---:|---:|---:|")
    for clients, r in rows:
        print(
            f"| {clients} | {r['rps']:.1f} | {r['tokens_s']:.0f} | {r['p50']:.0f} | {r['p95']:.0f} "
            f"| {r['batched']:.1f} |"
        )
    return 0


def _wait(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise SystemExit(f"kitchen serve exited:\n{log.read_text()[-3000:]}")
        try:
            httpx.get(f"{url}/health", timeout=5).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise SystemExit(f"kitchen serve did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
