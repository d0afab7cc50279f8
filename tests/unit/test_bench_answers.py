"""The bench's answer comparison: agreement up to the first difference, and the France answer."""

from __future__ import annotations

from chatgate.bench.answers import agreement, score_answers
from chatgate.bench.quality import PARIS_QUESTION, QUALITY_PROMPTS


def test_agreement_counts_tokens_before_the_first_difference() -> None:
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5  # the same fourth token after a difference does not count
    assert agreement([1, 2, 3, 4], [1, 2]) == 0.5  # stopping early is a difference
    assert agreement([1, 2], [1, 2, 3, 4]) == 0.5  # so is running on past the reference's end
    assert agreement([], []) == 1.0


def test_score_reads_the_france_answer_from_its_own_prompt() -> None:
    reference = [[7, 8]] * len(QUALITY_PROMPTS)
    replies = [[7, 8]] * (len(QUALITY_PROMPTS) - 1) + [[7, 0]]
    texts = ["no idea"] * len(QUALITY_PROMPTS)
    texts[QUALITY_PROMPTS.index(PARIS_QUESTION)] = "The capital of France is Paris."
    scored = score_answers(reference, replies, texts)
    assert scored["paris"] and scored["paris_answer"].endswith("Paris.")
    assert scored["identical_answers"] == (len(QUALITY_PROMPTS) - 1) / len(QUALITY_PROMPTS)
    assert scored["agreement_before_first_difference"] == (len(QUALITY_PROMPTS) - 0.5) / len(QUALITY_PROMPTS)
