"""The `fake` engine: a deterministic stand-in model for testing everything around an engine.

Its tokenizer is byte-level (one token per UTF-8 byte), so multi-byte characters arrive split
across tokens as they do with real models. Its greedy reply to a prompt is fixed and
predictable: `FakeEngine.reply_for(prompt_text)`, then an end-of-sequence token. Each token gets
a high logit for the scripted one and leaves the choice to the real sampler, so every sampling
parameter is exercised as it is with a real model. It reports cached prompt tokens as a prefix
cache of whole blocks would (`PromptMemory`), and with `max_running` it runs that many
generations at once under the scheduling policy (`FakeBatch`), so usage, queueing and `priority`
are exercised end to end.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence as Seq
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chatgate.engines.base import ChatOptions, Engine, GenerationOutput, ModelInfo, Phases, SamplingParams
from chatgate.engines.chat_tokens import template_error
from chatgate.engines.memory import MemoryNeed
from chatgate.engines.policy import Policy
from chatgate.engines.prefix_cache import DEFAULT_BLOCK, block_keys
from chatgate.engines.sampling import sample_with_logprob
from chatgate.engines.sequence import Sequence
from chatgate.settings import SchedulingPolicy

EOS = 256
BOS = 257
# With `fim=True`, the fill-in-the-middle tokens a code model has (as StarCoder spells them).
FIM_TOKENS = {"<fim_prefix>": 258, "<fim_suffix>": 259, "<fim_middle>": 260}
EMBEDDING_DIM = 16
_SANDBOX = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


class PromptMemory:
    """The block keys of recent prompts, as a prefix cache would hold their KV: a prompt's cached
    tokens are the whole blocks an earlier prompt under the same salt began with."""

    def __init__(self, *, blocks: int = 4096) -> None:
        self._keys: OrderedDict[int, None] = OrderedDict()
        self._limit = blocks

    def served(self, prompt: list[int], salt: str | None) -> int:
        """Tokens of `prompt` found cached; then remember `prompt` as prefilled."""
        keys = block_keys(prompt, DEFAULT_BLOCK, salt)
        hits = next((i for i, key in enumerate(keys) if key not in self._keys), len(keys))
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self._limit:
            self._keys.popitem(last=False)
        return min(hits * DEFAULT_BLOCK, len(prompt))


@dataclass(eq=False)
class Turn:
    """One generation's place in a `FakeBatch`."""

    priority: int
    arrival: int
    admitted: int = 0  # when it last got a place (a rising count); 0 while it waits
    preemptions: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class FakeBatch:
    """The fake engine's stand-in for a scheduler's batch: at most `max_running` generations hold
    a place (None: all of them), the rest wait in the policy's order; under priority, a waiting
    one that outranks a holder takes its place, and the holder waits to resume where it was."""

    def __init__(self, *, max_running: int | None, policy: SchedulingPolicy) -> None:
        self._policy = Policy(policy)
        self._max = max_running
        self._running: list[Turn] = []
        self._waiting: list[Turn] = []
        self._arrivals = 0
        self._admissions = 0
        self.preemptions = 0

    @property
    def running(self) -> int:
        """Generations holding a place."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Generations waiting for one."""
        return len(self._waiting)

    def arrive(self, priority: int) -> Turn:
        """A turn for a new generation (not waiting yet: `hold` it)."""
        self._arrivals += 1
        return Turn(priority=priority, arrival=self._arrivals)

    async def hold(self, turn: Turn) -> None:
        """Return once `turn` holds a place: at once if it does, else after waiting its turn."""
        if turn.admitted:
            return
        turn.ready.clear()
        self._waiting = self._policy.order([*self._waiting, turn])
        self._admit()
        await turn.ready.wait()

    def leave(self, turn: Turn) -> None:
        """`turn`'s generation ended (or went away): its place goes to the next."""
        self._running = [t for t in self._running if t is not turn]
        self._waiting = [t for t in self._waiting if t is not turn]
        self._admit()

    def _admit(self) -> None:
        while self._waiting:
            head = self._waiting[0]
            if self._max is not None and len(self._running) >= self._max:
                victim = self._policy.victim(self._running, outranked_by=head.priority)
                if victim is None:
                    return
                self._running.remove(victim)  # it notices before its next token, and waits
                victim.admitted = 0
                victim.preemptions += 1
                self.preemptions += 1
            self._waiting.pop(0)
            self._admissions += 1
            head.admitted = self._admissions
            self._running.append(head)
            head.ready.set()


class FakeEngine(Engine):
    """A byte-level fake model whose answers tests can predict."""

    def __init__(
        self,
        *,
        name: str = "fake-model",
        context_length: int = 1024,
        token_delay: float = 0.0,
        prefill_delay: float = 0.0,
        fail_after: int | None = None,
        tools_in_template: bool = False,
        max_running: int | None = None,
        scheduling_policy: SchedulingPolicy = "fcfs",
        fim: bool = False,
        weights_bytes: int = 0,
    ) -> None:
        self.fim = fim
        self.weights_bytes = weights_bytes  # what `memory_need` says a load takes (0: not checked)
        self.info = ModelInfo(
            name=name,
            context_length=context_length,
            vocab_size=BOS + 1 + (len(FIM_TOKENS) if fim else 0),
            embedding_dim=EMBEDDING_DIM,
            tools_in_template=tools_in_template,
            scheduling_policy=scheduling_policy,
        )
        self.batch = FakeBatch(max_running=max_running, policy=scheduling_policy)
        self.token_delay = token_delay
        self.prefill_delay = prefill_delay  # before the first token, as a long prompt's prefill
        self.fail_after = fail_after  # raise after this many tokens, to test error paths
        self.embed_calls: list[int] = []  # batch sizes the engine was asked to embed
        self.active = 0  # generations running now
        self.served = 0  # generations ever started
        self.prompts = PromptMemory()

    @staticmethod
    def reply_for(prompt: str) -> str:
        """The text the fake model answers `prompt` with (greedy)."""
        tail = prompt.strip().splitlines()[-2:] if prompt.strip() else [""]
        return f"Echo: {' '.join(tail)[-40:]} ✓ done."

    def memory_need(self) -> MemoryNeed | None:
        return MemoryNeed("cpu", self.weights_bytes) if self.weights_bytes else None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Seq[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def special_token(self, text: str) -> int | None:
        return FIM_TOKENS.get(text) if self.fim else None

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
        add_generation_prompt: bool = True, options: ChatOptions | None = None,
    ) -> str:
        options = options or ChatOptions()
        if options.template is not None:  # rendered as Hugging Face renders one, in a sandbox
            try:
                text = _SANDBOX.from_string(options.template).render(
                    messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **options.variables
                )
            except TemplateError as exc:
                raise template_error(exc, options) from None
            final = str(messages[-1].get("content") or "") if options.continue_final_message else ""
            return text[: text.rfind(final) + len(final)] if final and final in text else text
        lines = [f"<{m['role']}> {m.get('content') or ''}" for m in messages]
        if tools and self.info.tools_in_template:
            lines.insert(0, "<tools> " + " ".join(t["function"]["name"] for t in tools))
        if options.continue_final_message:  # the reply goes on from the last message's text
            return "\n".join(lines)
        return "\n".join(lines) + ("\n<assistant>" if add_generation_prompt else "")

    def pending(self) -> int:
        return self.active

    @property
    def eos_token_ids(self) -> list[int]:
        return [EOS]

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """A normalised histogram of token ids modulo the dimension: equal inputs, equal vectors."""
        self.embed_calls.append(len(inputs))
        await asyncio.sleep(self.token_delay)
        vectors = torch.zeros((len(inputs), EMBEDDING_DIM))
        for row, ids in enumerate(inputs):
            for token in ids:
                vectors[row, token % EMBEDDING_DIM] += 1.0
        return torch.nn.functional.normalize(vectors, dim=-1).tolist()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationOutput]:
        script = list(self.reply_for(self.decode(prompt_ids)).encode("utf-8")) + [EOS]
        seq = Sequence(prompt_ids=prompt_ids, params=params, decode=self.decode, eos_token_ids=frozenset({EOS}))
        turn = self.batch.arrive(params.priority)
        begun = time.time_ns()
        admitted: int | None = None
        self.active += 1
        self.served += 1
        try:
            await self.batch.hold(turn)
            admitted = time.time_ns()
            seq.cached_tokens = self.prompts.served(prompt_ids, params.cache_salt)
            if self.prefill_delay:
                await asyncio.sleep(self.prefill_delay)
            while not seq.finished:
                index = len(seq.output_ids)
                if index == self.fail_after:
                    raise RuntimeError("the fake engine failed as configured")
                await asyncio.sleep(self.token_delay)
                await self.batch.hold(turn)  # preempted meanwhile: wait to resume
                # The scripted token is far likelier than the rest; the real sampler decides.
                logits = torch.zeros(self.info.vocab_size)
                logits[script[min(index, len(script) - 1)]] = 10.0
                token, logprob = sample_with_logprob(
                    logits, params, prompt_ids=prompt_ids, output_ids=seq.output_ids, generator=seq.generator
                )
                output = seq.append(token, logprob)
                if output is not None and seq.finished:
                    first = seq.first_token_ns or None
                    yield replace(output, phases=Phases(queued=begun, admitted=admitted, first_token=first, finished=time.time_ns()))
                elif output is not None:
                    yield output
        finally:
            self.batch.leave(turn)
            self.active -= 1
