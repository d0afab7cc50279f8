"""Peak memory of a real worker under many concurrent long sequences: what `--kv-cache-gib` buys.

Starts `chatgate worker` with the default model, then sends each level's requests at once. Every
request is `--prompt-tokens` long and they share all but their last 8 tokens, so the prefix cache
makes their prefill cheap (the run stays short) while each sequence still holds a full-length
KV row. After each level it reads the worker's peak resident memory (VmHWM), which only grows,
so a level that adds nothing to the peak shows the budget held.

    PYTHONPATH=src .venv/bin/python scripts/kv_memory.py --kv-cache-gib 1 --levels 16,64
    PYTHONPATH=src .venv/bin/python scripts/kv_memory.py --kv-cache-gib 64 --levels 16   # no real bound
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from chatgate.bench.fleet import Member, free_port

SUFFIX = 8


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc (Linux only)")


def prompt(index: int, tokens: int) -> list[int]:
    """A prompt sharing all but its last `SUFFIX` tokens with every other one."""
    shared = [1000 + (i * 37) % 20000 for i in range(tokens - SUFFIX)]
    return shared + [30000 + index * SUFFIX + i for i in range(SUFFIX)]


async def level(http: httpx.AsyncClient, url: str, streams: int, tokens: int, max_tokens: int) -> float:
    """Send `streams` requests at once and wait for all; seconds taken."""
    start = time.perf_counter()

    async def one(index: int) -> None:
        body = {"prompt_token_ids": prompt(index, tokens), "max_new_tokens": max_tokens, "temperature": 0}
        response = await http.post(f"{url}/worker_generate", json=body)
        response.raise_for_status()

    await asyncio.gather(*(one(i) for i in range(streams)))
    return time.perf_counter() - start


async def measure(args: argparse.Namespace) -> list[dict[str, float]]:
    port = free_port()
    worker = Member(
        name="worker", port=port, logs=Path(tempfile.mkdtemp(prefix="kv-memory-")),
        args=["worker", "--no-register", "--host", "127.0.0.1", "--port", str(port), "--kv-cache-gib",
              str(args.kv_cache_gib), "--max-running", str(max(args.levels)), "--limit-worker-concurrency",
              str(max(args.levels) + 1)],
    )
    await worker.start(deadline=300)
    assert worker.proc is not None
    rows = []
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as http:
            await level(http, worker.url, 1, args.prompt_tokens, args.max_tokens)  # fills the prefix cache
            rows.append({"streams": 0, "peak_rss_gib": peak_rss(worker.proc.pid) / 2**30, "seconds": 0.0})
            for streams in args.levels:
                seconds = await level(http, worker.url, streams, args.prompt_tokens, args.max_tokens)
                rows.append({"streams": streams, "peak_rss_gib": peak_rss(worker.proc.pid) / 2**30, "seconds": seconds})
    finally:
        worker.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    for row in asyncio.run(measure(args)):
        print(json.dumps({"kv_cache_gib": args.kv_cache_gib, "prompt_tokens": args.prompt_tokens, **row}))


if __name__ == "__main__":
    main()
