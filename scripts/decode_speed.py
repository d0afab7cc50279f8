"""Decode-step speed of each weight format on the default model, with no serving around it.

Every format gets its own `FastDecoder` over the same float32 weights and its own batch cache of
`--rows` random prompts of `--prompt-tokens`; then rounds of `--steps` decode steps run format
after format (interleaved, so all see the same machine load), and the median round gives tok/s.
Ratios are against the first format listed.

    PYTHONPATH=src .venv/bin/python scripts/decode_speed.py --rows 1,16 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from chatgate.engines.decoder import FastDecoder
from chatgate.engines.kvcache import BatchKV
from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
from chatgate.settings import default_cache_dir


def prefill(decoder: FastDecoder, rows: int, tokens: int) -> BatchKV:
    kv = BatchKV(int(decoder.config.num_hidden_layers))
    kv.pads = [0] * rows
    ids = torch.randint(100, 40_000, (rows, tokens), generator=torch.Generator().manual_seed(rows))
    decoder(input_ids=ids, attention_mask=kv.attention_mask(tokens), position_ids=kv.positions(tokens), past_key_values=kv.cache)
    return kv


def round_seconds(decoder: FastDecoder, kv: BatchKV, steps: int) -> float:
    ids = torch.full((kv.rows, 1), 1000)
    start = time.perf_counter()
    for _ in range(steps):
        logits = decoder(input_ids=ids, attention_mask=kv.attention_mask(1), position_ids=kv.positions(1), past_key_values=kv.cache).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - start


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default="float32,bfloat16,int8")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = cached_checkpoint(resolve_chat_model("default"), default_cache_dir())
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    formats = args.formats.split(",")
    decoders = {f: FastDecoder(copy.deepcopy(model.eval()), weight_format=f) for f in formats}
    for rows in (int(r) for r in args.rows.split(",")):
        caches = {f: prefill(d, rows, args.prompt_tokens) for f, d in decoders.items()}
        times: dict[str, list[float]] = {f: [] for f in formats}
        for _ in range(args.rounds):
            for f, decoder in decoders.items():
                times[f].append(round_seconds(decoder, caches[f], args.steps))
        speed = {f: rows * args.steps / statistics.median(t) for f, t in times.items()}
        base = speed[formats[0]]
        print(f"rows={rows}: " + ", ".join(f"{f} {s:.1f} tok/s ({s / base:.2f}x)" for f, s in speed.items()), flush=True)


if __name__ == "__main__":
    main()
