"""Where the cache salt goes once the API server has derived it: into vLLM's prompt, not to an
arbitrary OpenAI-compatible upstream; and what it is derived from."""

from __future__ import annotations

from chatgate.api.auth import Caller, cache_salt, caller, key_digest
from chatgate.api.serving.generation import sampling_params
from chatgate.engines.base import SamplingParams
from chatgate.engines.vllm import vllm_prompt
from chatgate.protocol.openai import ChatCompletionRequest
from chatgate.protocol.worker import GenerateParams
from chatgate.upstream.wire import request


def test_the_salt_goes_into_vllms_prompt_only_when_there_is_one() -> None:
    assert vllm_prompt([1, 2], SamplingParams(max_tokens=1)) == {"prompt_token_ids": [1, 2]}
    salted = SamplingParams(max_tokens=1, cache_salt="ab12")
    assert vllm_prompt([1, 2], salted) == {"prompt_token_ids": [1, 2], "cache_salt": "ab12"}


def test_an_openai_upstream_is_not_sent_the_salt() -> None:
    for prompt in ({"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "hi"}):
        _, body = request(GenerateParams.model_validate({**prompt, "cache_salt": "ab12"}), "m")
        assert "cache_salt" not in body and "ab12" not in str(body)


def test_the_worker_salt_is_a_digest_of_the_callers_key_and_the_requests_salt() -> None:
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert sampling_params(chat)["cache_salt"] is None  # no key, no salt: the shared cache
    salted = chat.model_copy(update={"cache_salt": "mine"})
    unkeyed = sampling_params(salted)["cache_salt"]
    token = caller.set(Caller(key_digest(b"sk-secret"), "store", None))
    try:
        keyed, keyed_plain = sampling_params(salted)["cache_salt"], sampling_params(chat)["cache_salt"]
        assert keyed == cache_salt("mine") and keyed_plain == cache_salt(None)
    finally:
        caller.reset(token)
    assert len({unkeyed, keyed, keyed_plain}) == 3
    assert all(isinstance(s, str) and len(s) == 64 and "secret" not in s and "mine" not in s for s in (unkeyed, keyed, keyed_plain))
    assert key_digest(b"sk-secret") == key_digest(b"sk-secret") != key_digest(b"sk-other")
