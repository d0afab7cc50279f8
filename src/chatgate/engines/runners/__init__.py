"""Runners: what executes the scheduler's plan on a backend and hands logits back.

The scheduler (`engines/scheduler.py`) decides which sequences prefill, decode, wait or give
their KV back; a runner only runs forward passes over the KV it owns and returns the logits of
each row's last position. Sampling, constraints, logprobs, detokenizing and stop strings sit
above it, so every runner serves every feature the same way.
- `torch`: our Llama forward or a Hugging Face model, over padded batch rows (`kvcache.py`).
- `llama.cpp`: a GGUF file through llama-cpp-python's low-level API, one sequence id per row.
"""
