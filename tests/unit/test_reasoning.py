"""Reasoning parsers: where thinking starts (from the prompt), how streamed text splits at the
tags however it is cut, and the gate that holds a grammar back until the thinking ends."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import get_args

import pytest
import torch

from chatgate.engines.reasoning import PARSERS, Phase, ReasoningSplitter, ThinkTags, first_phase
from chatgate.settings import ReasoningParser

R1, QWEN3 = PARSERS["deepseek_r1"], PARSERS["qwen3"]
CHATML = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def split(tags: ThinkTags, prompt: str, pieces: list[str]) -> tuple[str, str]:
    """The whole thinking and answer of a reply streamed as `pieces`."""
    splitter = ReasoningSplitter(tags, prompt)
    reasoning = content = ""
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    return reasoning + r, content + c


def test_the_settings_name_every_parser() -> None:
    assert set(get_args(ReasoningParser)) == set(PARSERS)


@pytest.mark.parametrize(
    ("tags", "prompt", "phase"),
    [
        (R1, CHATML, Phase.THINKING),  # deepseek_r1: the template may have given the opening tag
        (QWEN3, CHATML, Phase.OPENING),  # qwen3: thinking only if the reply opens it
        (QWEN3, CHATML + "<think>\n", Phase.THINKING),  # the template opened it
        (R1, CHATML + "<think>\n\n</think>\n\n", Phase.ANSWER),  # the template closed it (thinking off)
        (QWEN3, CHATML + "<think>\n\n</think>\n\n", Phase.ANSWER),
        # Earlier turns' closed thinking does not count; an open tag after it does.
        (QWEN3, "<think>a</think>b" + CHATML + "<think>", Phase.THINKING),
        (QWEN3, "<think>a</think>b" + CHATML, Phase.OPENING),
    ],
)
def test_the_prompt_says_where_the_reply_starts(tags: ThinkTags, prompt: str, phase: Phase) -> None:
    assert first_phase(tags, prompt) is phase


REPLIES = [
    # (parser, prompt, reply, thinking, answer)
    (R1, CHATML, "I should greet.</think>\n\nHello!", "I should greet.", "\n\nHello!"),
    (R1, CHATML, "<think>I should greet.</think>Hello!", "I should greet.", "Hello!"),  # tag given anyway
    (R1, CHATML, "still thinking <thi", "still thinking <thi", ""),  # cut off: all of it is thinking
    (R1, CHATML + "<think>\n\n</think>\n\n", "Hello </think> there", "", "Hello </think> there"),
    (QWEN3, CHATML, "Hello, no thinking.", "", "Hello, no thinking."),
    (QWEN3, CHATML, "<think>hmm</think>Hi", "hmm", "Hi"),
    (QWEN3, CHATML, "\n<think>hmm</think>Hi", "hmm", "Hi"),
    (QWEN3, CHATML, "<thinking is not a tag", "", "<thinking is not a tag"),
    (QWEN3, CHATML, "<", "", "<"),  # undecided when the reply ended: the answer
    (QWEN3, CHATML + "<think>\n", "a < b </ c </think>x", "a < b </ c ", "x"),
]


@pytest.mark.parametrize(("tags", "prompt", "reply", "thinking", "answer"), REPLIES)
def test_a_reply_splits_at_the_tags_however_it_streams(
    tags: ThinkTags, prompt: str, reply: str, thinking: str, answer: str
) -> None:
    assert split(tags, prompt, [reply]) == (thinking, answer)
    assert split(tags, prompt, list(reply)) == (thinking, answer)  # a character at a time
    for cut in itertools.combinations(range(1, len(reply)), 2):  # every three-piece cut
        pieces = [reply[: cut[0]], reply[cut[0] : cut[1]], reply[cut[1] :]]
        assert split(tags, prompt, pieces) == (thinking, answer), pieces


def test_no_tag_text_is_handed_out_before_it_is_known() -> None:
    splitter = ReasoningSplitter(R1, CHATML)
    assert splitter.feed("ok </thi") == ("ok ", "")  # "</thi" may be the end tag: held
    assert splitter.feed("nk>") == ("", "")
    assert splitter.phase is Phase.ANSWER
    assert splitter.feed("A") == ("", "A")


class _Recording:
    """A stand-in grammar constraint that records what reaches it."""

    def __init__(self) -> None:
        self.accepted: list[int] = []
        self.masked = 0
        self.cut = False

    def start(self) -> _Recording:
        return self

    def mask(self, logits: torch.Tensor, remaining: int) -> None:
        self.masked += 1
        logits[1:] = float("-inf")

    def accept(self, token: int) -> bool:
        self.accepted.append(token)
        return token == 0


def test_the_gate_holds_the_grammar_back_until_the_end_tag_is_generated() -> None:
    from chatgate.engines.reasoning import GatedGrammar

    spelled = {1: b"hmm <", 2: b"/th", 3: b"ink", 4: b">\n", 0: b"{"}
    inner = _Recording()
    gate = GatedGrammar(inner, "</think>", lambda t: spelled[t]).start()
    for token in (1, 2, 3):
        logits = torch.zeros(5)
        gate.mask(logits, 10)
        assert bool(torch.isfinite(logits).all())  # thinking: nothing forbidden
        assert gate.accept(token)
    assert gate.accept(4)  # the tag is complete: the grammar starts after this token
    assert inner.accepted == [] and gate.inner is inner
    logits = torch.zeros(5)
    gate.mask(logits, 10)
    assert inner.masked == 1 and not bool(torch.isfinite(logits[1:]).any())
    assert gate.accept(0) and inner.accepted == [0]
    assert not gate.accept(3)  # the grammar refuses, through the gate


@pytest.mark.model
def test_a_json_grammar_binds_only_the_answer_with_the_models_tokenizer() -> None:
    """Through the real compiler and tokenizer: free text while thinking (a grammar started at
    once would refuse it), then only JSON."""
    from transformers import AutoTokenizer

    from chatgate.engines.constraints import ConstraintCompiler
    from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
    from chatgate.engines.reasoning import GatedGrammar
    from chatgate.settings import default_cache_dir

    tokenizer = AutoTokenizer.from_pretrained(cached_checkpoint(resolve_chat_model("default"), default_cache_dir()))
    compiler = ConstraintCompiler(tokenizer, len(tokenizer))
    grammar = compiler.compile({"type": "json_object"})
    gate = GatedGrammar(grammar, "</think>", lambda t: compiler.vocabulary.bytes[t]).start()
    thinking = compiler.tokenizer.tokenize_str("Plain words, not JSON.</think>")
    assert not grammar.start().accept(thinking[0])  # ungated, the grammar refuses the thinking
    for token in thinking:
        logits = torch.zeros(compiler.vocabulary.size)
        gate.mask(logits, 100)
        assert bool(torch.isfinite(logits).all())
        assert gate.accept(token)
    logits = torch.zeros(compiler.vocabulary.size)
    gate.mask(logits, 100)
    allowed = [compiler.vocabulary.bytes[t] for t in torch.nonzero(torch.isfinite(logits)).flatten().tolist()]
    assert allowed and all(b.startswith(b"{") for b in allowed)
    for token in compiler.tokenizer.tokenize_str('{"a":1}'):
        assert gate.accept(token)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--reasoning-parser", "deepseek-r1"], "--reasoning-parser"),  # vLLM's spelling has an underscore
        (["--reasoning-parser", "bogus"], "--reasoning-parser"),
        (["--chat-template", "/nonexistent/template.jinja"], "--chat-template"),
    ],
)
def test_a_bad_flag_stops_the_start_with_a_message_naming_it(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from chatgate.cli import main

    for command in ("serve", "worker"):
        with pytest.raises(SystemExit) as stopped:
            main([command, *flags])
        assert stopped.value.code == 2
        assert named in capsys.readouterr().err


def test_the_flags_take_vllms_parser_names_and_a_template_file(tmp_path: Path) -> None:
    from chatgate.cli import build_settings, parser
    from chatgate.settings import ServeSettings

    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    args = parser().parse_args(["serve", "--reasoning-parser", "qwen3", "--chat-template", str(template)])
    settings = build_settings(ServeSettings, args)
    assert settings.reasoning_parser == "qwen3" and settings.chat_template_text() == template.read_text()
    assert build_settings(ServeSettings, parser().parse_args(["serve"])).reasoning_parser is None
