"""The `openai` engine's reading of an upstream's echoing completion stream: the prompt's
log-probabilities are told apart from the generated tokens' (as vLLM and chatgate send them)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatgate.errors import InvalidRequestError, WorkerError
from chatgate.protocol.worker import GenerateParams
from chatgate.upstream.wire import StreamReader, echoed_prompt


def event(tokens: list[str], values: list[float | None], offsets: list[int], text: str) -> dict[str, Any]:
    tops = [None if v is None else {t: v} for t, v in zip(tokens, values, strict=True)]
    logprobs = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
    return {"choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": None}]}


# "Hi there" echoed with the first generated token " friend", then one more token.
FIRST = event(["Hi", " there", " friend"], [None, -2.5, -0.5], [0, 2, 8], "Hi there friend")
NEXT = event(["!"], [-0.1], [15], "!")


@pytest.mark.parametrize("prompt", ["Hi there", [101, 102]])
def test_the_echoing_event_splits_at_the_prompt(prompt: str | list[int]) -> None:
    params = GenerateParams.model_validate(
        {"model": "m", "echo": True, "logprobs": 1, **({"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt})}
    )
    reader = StreamReader(chat=False, echoed=echoed_prompt(params))
    first, second = reader.event(FIRST), reader.event(NEXT)
    assert first is not None and second is not None
    assert first.prompt_logprobs is not None
    assert [(p.token, p.logprob) for p in first.prompt_logprobs] == [("Hi", None), (" there", -2.5)]
    assert first.prompt_logprobs[0].top == [] and first.prompt_logprobs[1].top[0].logprob == -2.5
    assert [(t.token, t.logprob) for t in first.token_logprobs or []] == [(" friend", -0.5)]
    assert second.prompt_logprobs is None and [t.token for t in second.token_logprobs or []] == ["!"]


def test_without_echo_every_entry_is_a_generated_token() -> None:
    params = GenerateParams.model_validate({"model": "m", "prompt": "Hi there", "logprobs": 1})
    reader = StreamReader(chat=False, echoed=echoed_prompt(params))
    chunk = reader.event(FIRST)
    assert chunk is not None and chunk.prompt_logprobs is None and len(chunk.token_logprobs or []) == 3


def test_an_error_event_with_a_4xx_code_is_the_clients_error() -> None:
    # vLLM's shape for a request it refuses once the stream has begun.
    refused = {"error": {"message": "token_id(s) [999999] in logit_bias contain out-of-vocab token ids",
                         "type": "BadRequestError", "param": "logit_bias", "code": 400}}
    with pytest.raises(InvalidRequestError) as caught:
        StreamReader(chat=False).event(refused)
    assert caught.value.param == "logit_bias" and "999999" in str(caught.value)
    with pytest.raises(WorkerError):
        StreamReader(chat=False).event({"error": {"message": "engine died", "code": 500}})


def test_tool_call_arguments_that_are_not_an_object_pass_on_as_sent() -> None:
    reader = StreamReader(chat=True)
    for arguments in ('"Par', 'is"'):  # vLLM 0.32's call for SmolLM2: a JSON string, in pieces
        reader.event({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"name": "weather" if arguments == '"Par' else None, "arguments": arguments}}]}}]})
    assert json.loads(reader.last().text) == {"tool_calls": [{"name": "weather", "arguments": '"Paris"'}]}


@pytest.mark.parametrize(("constraint", "fields"), [
    ({"type": "regex", "regex": r"\d+", "param": "guided_regex"}, {"structured_outputs": {"regex": r"\d+"}}),
    ({"type": "choice", "choice": ["a", "b"], "param": "guided_choice"}, {"structured_outputs": {"choice": ["a", "b"]}}),
    ({"type": "grammar", "grammar": 'root ::= "a"', "param": "grammar"}, {"structured_outputs": {"grammar": 'root ::= "a"'}}),
    ({"type": "json_object"}, {"response_format": {"type": "json_object"}}),
])
def test_constraints_reach_the_upstream_as_vllm_takes_them(constraint: dict[str, Any], fields: dict[str, Any]) -> None:
    """A regex, choice or grammar goes as vLLM's `structured_outputs` (OpenAI has no such field),
    JSON as OpenAI's `response_format`; chatgate's own `param` stays home."""
    from chatgate.upstream.wire import request

    for extra in ({"prompt": "hi"}, {"messages": [{"role": "user", "content": "hi"}]}):
        _, body = request(GenerateParams.model_validate({"model": "m", "response_format": constraint, **extra}), "m")
        assert {k: body[k] for k in fields} == fields
        assert "param" not in json.dumps(body)


def test_suffix_reaches_the_upstream() -> None:
    from chatgate.upstream.wire import request

    _, body = request(GenerateParams.model_validate({"model": "m", "prompt": "def f(", "suffix": "):\n"}), "m")
    assert body["suffix"] == "):\n" and body["prompt"] == "def f("
