"""Load test for `dualbrain serve` (issue 15): concurrent streaming clients on loopback, bounded in requests
and time.

    python tests/benchmarks/serve_load.py [--workdir /tmp/dualbrain-serve-load] [--requests 48]
                                          [--time-limit 120] [--no-ray]

Makes the tiny MoE checkpoint and its export (if the workdir has none), then for each setup starts
`dualbrain serve` on a free loopback port, warms it up, and runs N clients, each sending streaming
completions one after another (prompts of 4..120 tokens, max_tokens 16..64, greedy) until the setup's
requests are done or the time limit passes:

    single process --max-batch 1, 1 client and 8 clients   (no batching: the baseline)
    single process --max-batch 8, 1 client and 8 clients   (continuous batching)
    Ray Serve, 2 replicas of --max-batch 8, 8 clients       (unless --no-ray)

Reports per setup: aggregate decode throughput (completion tokens / wall time), time to first token and
per-token latency (the gaps between a stream's tokens after its first) P50/P95, as a markdown table and
one JSON line; and the ratio the issue asks for: 8 clients over 1 client at --max-batch 8.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

WORDS = ("the robot counts clouds and writes poems about the sea while the cat asks why numbers help it "
         "think about neural networks that learn from errors one small step at a time").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_export(workdir: Path) -> Path:
    from dualbrain.exporter.export import export_checkpoint
    from dualbrain.exporter.tiny import make_tiny

    ckpt, out = workdir / "tiny-moe", workdir / "tiny-moe-onnx"
    if not (out / "manifest.json").is_file():
        make_tiny(ckpt, family="moe")
        export_checkpoint(ckpt, out)
    return out


def start_server(export: Path, args: list[str], timeout: float = 180) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dualbrain.cli", "serve", str(export), "--port", str(port),
                             "--ort-threads", "1", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {args}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start in {timeout} s: {args}")


def jobs(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 100))), rng.randint(16, 64)) for _ in range(n)]


async def one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, usage = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    tokens = usage["completion_tokens"]
    gaps = np.diff(stamps).tolist() if len(stamps) > 1 else []
    # a chunk may carry several tokens (the server sends what is ready): spread its gap over them
    per_token = (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 and len(stamps) > 1 else None
    return {"ttft": stamps[0] - t0 if stamps else None, "tokens": tokens, "gaps": gaps, "per_token": per_token}


async def run_clients(url: str, clients: int, work: list[tuple[str, int]], time_limit: float) -> dict:
    queue = list(work)
    results = []
    t0 = time.perf_counter()

    async def client_loop(client):
        while queue and time.perf_counter() - t0 < time_limit:
            prompt, max_tokens = queue.pop()
            results.append(await one(client, url, prompt, max_tokens))

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    per_token = [r["per_token"] for r in results if r["per_token"] is not None]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "throughput_tok_s": round(tokens / wall, 1),
            "ttft_ms_p50": round(1e3 * float(np.percentile(ttft, 50)), 1),
            "ttft_ms_p95": round(1e3 * float(np.percentile(ttft, 95)), 1),
            "per_token_ms_p50": round(1e3 * float(np.percentile(per_token, 50)), 2),
            "per_token_ms_p95": round(1e3 * float(np.percentile(per_token, 95)), 2)}


def measure(export: Path, name: str, server_args: list[str], client_counts, n_requests: int, time_limit: float):
    proc, url = start_server(export, server_args)
    try:
        asyncio.run(run_clients(url, 2, jobs(4, seed=99), time_limit))          # warm-up
        rows = []
        for clients in client_counts:
            row = {"setup": name, **asyncio.run(run_clients(url, clients, jobs(n_requests, seed=1), time_limit))}
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dualbrain-serve-load"))
    ap.add_argument("--requests", type=int, default=48, help="requests per measurement")
    ap.add_argument("--time-limit", type=float, default=120, help="seconds per measurement at most")
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    export = ensure_export(args.workdir)
    setups = [("single process, --max-batch 1", ["--max-batch", "1"], (1, 8)),
              ("single process, --max-batch 8", ["--max-batch", "8"], (1, 8))]
    if not args.no_ray:
        setups.append(("Ray Serve, 2 replicas x --max-batch 8", ["--ray", "--replicas", "2", "--max-batch", "8"], (8,)))
    rows = [r for name, server_args, counts in setups
            for r in measure(export, name, server_args, counts, args.requests, args.time_limit)]
    print("\n| setup | clients | requests | tokens | tok/s | TTFT P50 / P95 (ms) | per-token P50 / P95 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['throughput_tok_s']} | "
              f"{r['ttft_ms_p50']} / {r['ttft_ms_p95']} | {r['per_token_ms_p50']} / {r['per_token_ms_p95']} |")
    batched = {r["clients"]: r["throughput_tok_s"] for r in rows if r["setup"] == setups[1][0]}
    ratio = batched[8] / batched[1]
    print(f"\n8 clients / 1 client at --max-batch 8: {ratio:.2f}x aggregate decode throughput")
    return 0 if ratio >= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
