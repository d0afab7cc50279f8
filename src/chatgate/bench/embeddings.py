"""Embedding throughput: one large request against many small concurrent ones, same run.

    python -m chatgate.bench.embeddings --url http://127.0.0.1:8000/v1 --model all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx


def sentences(count: int) -> list[str]:
    """Short varied sentences, as a retrieval workload sends."""
    topics = ["weather", "football", "cooking", "markets", "music", "travel", "science", "history"]
    return [f"Sentence {i} is a short remark about {topics[i % len(topics)]} and item {i * 7 % 101}." for i in range(count)]


async def one_request(http: httpx.AsyncClient, url: str, model: str, texts: list[str]) -> float:
    """Seconds for one request carrying every input."""
    start = time.perf_counter()
    response = await http.post(f"{url}/embeddings", json={"model": model, "input": texts})
    response.raise_for_status()
    return time.perf_counter() - start


async def many_requests(http: httpx.AsyncClient, url: str, model: str, texts: list[str], concurrency: int) -> float:
    """Seconds for one request per input, `concurrency` in flight at a time."""
    queue = list(texts)

    async def client() -> None:
        while queue:
            text = queue.pop()
            response = await http.post(f"{url}/embeddings", json={"model": model, "input": text})
            response.raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start


async def run(url: str, model: str, count: int, concurrency: int, rounds: int) -> dict[str, float]:
    """Best-of-`rounds` embeddings/s for both shapes, interleaved so noise hits both alike."""
    texts = sentences(count)
    async with httpx.AsyncClient(timeout=300) as http:
        await one_request(http, url, model, texts[:8])  # warm up
        batch, single = [], []
        for _ in range(rounds):
            batch.append(await one_request(http, url, model, texts))
            single.append(await many_requests(http, url, model, texts, concurrency))
    result = {
        "inputs": count,
        "concurrency": concurrency,
        "one_request_per_s": count / min(batch),
        "concurrent_singles_per_s": count / min(single),
    }
    result["ratio_one_request_over_singles"] = result["one_request_per_s"] / result["concurrent_singles_per_s"]
    return result


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.url, args.model, args.inputs, args.concurrency, args.rounds)), indent=2))


if __name__ == "__main__":
    main()
