"""`UpstreamService`: a worker backend that forwards each request to an OpenAI-compatible server.

The upstream (vLLM, SGLang, TGI, Ollama, llama.cpp, a hosted API or another chatgate) templates,
tokenizes and generates; this backend registers its models, forwards chat, completions and
embeddings as streamed requests over one pooled HTTP client, and translates errors at this one
boundary (`wire.error_from`). Closing a generation closes the upstream stream, which is how
every OpenAI-compatible server learns the client went away. No error a client sees names the
upstream's URL or key: transport failures get a generic message here, with the detail logged.

The request's cache salt (the API server's digest of the caller's key and `cache_salt`) is not
forwarded: an arbitrary upstream may refuse a field it does not know, and only vLLM-like servers
have one. Callers with different keys may therefore share the upstream's prefix cache; where
that matters, serve the model with `--engine vllm` (which passes the salt to vLLM) or turn the
upstream's prefix caching off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
from opentelemetry.trace import INVALID_SPAN, Span

from chatgate import tracing
from chatgate.engines.base import EngineStats
from chatgate.errors import (
    ChatgateError, InvalidRequestError, ModelNotFoundError, StartupError, WorkerError, WorkerUnavailableError,
)
from chatgate.protocol.admin import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from chatgate.protocol.conversation import Conversation, generic_conversation
from chatgate.protocol import worker as proto
from chatgate.settings import EngineSettings
from chatgate.upstream import wire
from chatgate.upstream.tokens import TokenCounter
from chatgate.worker.backend import request_queue
from chatgate.worker.queue import RequestQueue

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096  # assumed when neither the upstream nor --max-model-len says


class UpstreamService:
    """Serves the models of one OpenAI-compatible upstream under their names (or given ones)."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        url: str,
        model_names: list[str],
        upstream_model: str | None,
        context_length: tuple[int, str],
        counter: TokenCounter,
        queue: RequestQueue,
        api_key: str | None = None,
    ) -> None:
        self._http = http
        self.url = url.rstrip("/")
        self._secrets = wire.Secrets.of(self.url, api_key)
        self._shown = wire.without_credentials(self.url)  # the URL as logs and details name it
        self.model_names = model_names
        self._upstream_model = upstream_model
        self._context, self._context_source = context_length
        self._counter = counter
        self.queue = queue
        self.served = 0

    # Generation ------------------------------------------------------------------------------

    def generate(self, params: proto.GenerateParams) -> AsyncGenerator[proto.WorkerChunk, None]:
        """Stream the upstream's completion as delta chunks; errors before the first raise."""
        return self.queue.serve(self._generate(params))

    async def _generate(self, params: proto.GenerateParams) -> AsyncGenerator[proto.WorkerChunk, None]:
        path, body = wire.request(params, self._upstream_model or params.model)
        self.served += 1
        # Not current across the yields below; the upstream call names it as its parent.
        span = tracing.start_generation(params)
        try:
            reader = wire.StreamReader(
                chat=path == "/chat/completions", echoed=wire.echoed_prompt(params), secrets=self._secrets,
                prompt_tokens=await self._prompt_tokens(params), shared_cache=params.cache_salt is not None,
            )
            async for data in self._events(path, body, span):
                chunk = reader.event(data)
                if chunk is not None:
                    yield chunk
            last = reader.last()
            if last.usage is not None and span.is_recording():
                tracing.genai_usage(
                    span, input_tokens=last.usage.prompt_tokens, output_tokens=last.usage.completion_tokens,
                    finish_reasons=[last.finish_reason] if last.finish_reason else [],
                )
            yield last
        except BaseException as exc:
            if span.is_recording() and not isinstance(exc, GeneratorExit):
                tracing.failed(span, exc)
            raise
        finally:
            span.end()

    async def _events(self, path: str, body: dict[str, Any], span: Span = INVALID_SPAN) -> AsyncIterator[dict[str, Any]]:
        """The JSON events of a streamed upstream response; the stream closes when this does."""
        request = self._http.build_request("POST", f"{self.url}{path}", json=body)
        with tracing.current(span):  # the request carries `span` as its traceparent
            response = await self._send(request)
        complete = False
        try:
            if response.status_code != 200:
                raise wire.error_from(response.status_code, await response.aread(), self._secrets)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                yield json.loads(payload)
            complete = True
        except httpx.TransportError as exc:
            log.warning("the upstream %s failed mid-stream: %r", self._shown, exc)
            raise WorkerError("The model's upstream server failed mid-stream.") from None
        finally:
            # Shielded: a cancelled client must still close the upstream stream, or the upstream
            # keeps generating for nobody.
            with anyio.CancelScope(shield=True):
                if not complete:
                    network = response.extensions.get("network_stream")
                    if network is not None:
                        await network.aclose()
                await response.aclose()

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: httpx.TransportError) -> WorkerUnavailableError:
        log.warning("the upstream %s is unreachable: %r", self._shown, exc)
        return WorkerUnavailableError("The model's upstream server is unreachable.")

    async def _prompt_tokens(self, params: proto.GenerateParams) -> int:
        """The prompt's tokens as counted here: the usage of every chunk until the upstream's own
        arrives at the end (if it ever does), so a stream left early is still accounted."""
        if params.prompt_token_ids is not None:
            return len(params.prompt_token_ids)
        request = proto.CountTokenRequest(prompt=params.prompt, messages=params.messages)
        if self._counter.tokenizer is None:  # an estimate: a few arithmetic operations
            return self._counter.count(request)
        return await asyncio.to_thread(self._counter.count, request)

    # Embeddings and tokens -------------------------------------------------------------------

    async def score_pairs(self, params: proto.ScorePairsParams) -> proto.ScorePairsResult:
        """Not passed upstream: an upstream's model is scored by embedding (`/v1/embeddings`)."""
        raise InvalidRequestError(f"The model `{params.model}` is not a cross-encoder served here.", param="model")

    async def embed(self, params: proto.EmbedParams) -> proto.EmbedResult:
        """The upstream's embeddings of the inputs, in input order."""
        inputs: Any = params.input_token_ids if params.input_token_ids is not None else params.input
        body = {"model": self._upstream_model or params.model, "input": inputs}
        self.served += 1
        try:
            response = await self._http.post(f"{self.url}/embeddings", json=body)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code != 200:
            raise wire.error_from(response.status_code, response.content, self._secrets)
        data = response.json()
        vectors = [item["embedding"] for item in sorted(data["data"], key=lambda item: item["index"])]
        tokens = int((data.get("usage") or {}).get("prompt_tokens", 0))
        return proto.EmbedResult(embedding=vectors, token_num=tokens)

    async def count_tokens(self, request: proto.CountTokenRequest) -> int:
        """Tokens of the prompt by the model's tokenizer if known, else a character estimate."""
        return self._counter.count(request)

    async def tokenize(self, params: proto.TokenizeParams) -> proto.TokenizeResult:
        """Not offered: an upstream's exact token ids are not known here (no `tokenize` extension)."""
        raise InvalidRequestError("Tokenizing is not supported by this worker.", param="model")

    async def detokenize(self, params: proto.DetokenizeParams) -> proto.DetokenizeResult:
        """Not offered, as `tokenize`."""
        raise InvalidRequestError("Detokenizing is not supported by this worker.", param="model")

    # Status ----------------------------------------------------------------------------------

    def load(self) -> tuple[int, int]:
        """Requests in flight here (the upstream's own queue is not visible)."""
        return self.queue.active, self.queue.active

    def status(self) -> proto.WorkerStatus:
        """What the worker reports to the controller."""
        return proto.WorkerStatus(model_names=self.model_names, speed=1.0, queue_length=self.queue.active)

    def engine_stats(self) -> EngineStats | None:
        """None: the upstream keeps its own engine counters."""
        return None

    def conversation(self) -> Conversation:
        """A generic conversation for FastChat's API server: the upstream's template is unseen."""
        return generic_conversation()

    # An upstream keeps its own models and adapters: none are loaded or unloaded through chatgate.

    def knows(self, name: str) -> bool:
        """Whether the upstream's model is served under `name`."""
        return name in self.model_names

    async def load_model(self) -> None:
        """Refused: the upstream loads its own models."""
        raise InvalidRequestError("This model is served by an upstream server: load it there.", param="model")

    async def unload_model(self) -> None:
        """Refused: the upstream unloads its own models."""
        raise InvalidRequestError("This model is served by an upstream server: unload it there.", param="model")

    def serves_lora(self) -> bool:
        """False: adapters are the upstream's own business."""
        return False

    def lora_names(self) -> list[str]:
        """None are loaded through chatgate."""
        return []

    async def load_lora(self, params: LoadLoraAdapterRequest) -> None:
        """Refused: load the adapter at the upstream."""
        raise InvalidRequestError("This model is served by an upstream server: load adapters there.", param="lora_path")

    async def unload_lora(self, params: UnloadLoraAdapterRequest) -> None:
        """Refused: nothing is loaded here."""
        raise ModelNotFoundError(f"The LoRA adapter `{params.lora_name}` is not loaded.", param="lora_name")

    def details(self) -> proto.ModelDetails:
        """Context length, how tokens are counted, and the extensions (the upstream templates)."""
        return proto.ModelDetails.model_validate(
            {
                "context_length": self._context,
                "context_length_source": self._context_source,
                "chatgate_extensions": [proto.EXT_CHAT_TEMPLATE, proto.EXT_DELTA],
                "generates": True,
                "concurrency": self.queue.limit,
                "token_count": self._counter.method,
                "upstream": self._shown,
            }
        )


async def _upstream_models(http: httpx.AsyncClient, url: str, wait: float) -> list[dict[str, Any]]:
    """The upstream's `/v1/models` entries, retried until `wait` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        try:
            response = await http.get(f"{url}/models", timeout=10.0)
            response.raise_for_status()
            return list(response.json().get("data") or [])
        except (httpx.HTTPError, ValueError) as exc:
            shown = wire.without_credentials(url)
            if time.monotonic() >= deadline:
                raise StartupError(f"the upstream {shown} did not list its models: {_what_failed(exc)}") from exc
            log.info("waiting for the upstream %s: %s", shown, _what_failed(exc))
            await asyncio.sleep(1.0)


def _what_failed(error: Exception) -> str:
    """What went wrong with a call to the upstream, without its URL: httpx puts the whole URL in
    its messages, credentials and query included."""
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code}"
    if isinstance(error, httpx.HTTPError):
        said = str(error)  # a transport error's ("[Errno 111] Connection refused"), unless it quotes a URL
        return type(error).__name__ + (f": {said}" if said and "://" not in said else "")
    return f"not JSON ({type(error).__name__})"


def _context(models: list[dict[str, Any]], flag: int | None) -> tuple[int, str]:
    """The context length and where it came from: the upstream, the flag, or an assumption."""
    reported = [int(m["max_model_len"]) for m in models if isinstance(m.get("max_model_len"), int)]
    if reported:
        return min(reported), "upstream"
    if flag is not None:
        return flag, "flag"
    return DEFAULT_CONTEXT, "assumed"


def _client(settings: EngineSettings) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
    # No read timeout: a long generation may pause between tokens; connecting must be quick.
    timeout = httpx.Timeout(None, connect=10.0)
    limits = httpx.Limits(max_connections=settings.limit_worker_concurrency + 8)
    # A call made within a trace carries its traceparent: the upstream's spans join the trace.
    return httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits, event_hooks=tracing.HTTPX_HOOKS)


@contextlib.asynccontextmanager
async def open_upstream(settings: EngineSettings) -> AsyncIterator[UpstreamService]:
    """Connect to `settings.upstream_url`, learn its models, and serve them until exit."""
    if not settings.upstream_url:  # per model (`--model 'x engine=openai upstream-url=...'`), so checked here
        raise StartupError("--engine openai needs --upstream-url (e.g. http://host:8000/v1)")
    url = settings.upstream_url.rstrip("/")
    async with _client(settings) as http:
        models: list[dict[str, Any]] = []
        if not settings.model_names or settings.max_model_len is None:
            try:
                models = await _upstream_models(http, url, settings.upstream_wait if not settings.model_names else 0)
            except StartupError:  # with the names given, the upstream may list its models later
                if not settings.model_names:
                    raise
        names = settings.model_names or [str(m["id"]) for m in models]
        tokenizer = settings.model_path if Path(settings.model_path).is_dir() else None
        counter = await asyncio.to_thread(TokenCounter.load, tokenizer)
        log.info("serving %s from the upstream %s (token counts: %s)", names, wire.without_credentials(url), counter.method)
        yield UpstreamService(
            http=http,
            url=url,
            model_names=names,
            upstream_model=settings.upstream_model,
            context_length=_context(models, settings.max_model_len),
            counter=counter,
            queue=request_queue(settings, names[0] if names else "upstream"),
            api_key=settings.upstream_api_key,
        )

