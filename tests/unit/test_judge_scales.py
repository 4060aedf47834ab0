"""The judge's reply parsing and prompt fill-in, checked against the public scripts.

Traits: lu-christina/persona-subspace ``traits/4_judge.py`` (commit 8daaf83)
``parse_judge_score``: ``"REFUSAL" in response_text.upper()`` -> "REFUSAL", else the first
``re.findall(r'\\b(\\d+)\\b', text)`` if 0 <= n <= 100, else None.
Roles: safety-research/assistant-axis ``assistant_axis/judge.py`` line 68
``parse_judge_score``: the first ``\\b(\\d+)\\b`` (line 82) if 0 <= n <= 3, else None.
Prompt: ``pipeline/3_judge.py`` line 100 ``eval_prompt_template.format(question=...,
answer=...)``, sent as one user message.
"""

from __future__ import annotations

import re

import pytest

from app.judge.scales import REFUSAL, ROLES, TRAITS, judge_prompt, scale_for


def _public_traits(text):
    """persona-subspace traits/4_judge.py parse_judge_score, restated."""
    if not text:
        return None
    if "REFUSAL" in text.upper():
        return "REFUSAL"
    numbers = re.findall(r"\b(\d+)\b", text.strip())
    if not numbers:
        return None
    score = int(numbers[0])
    return score if 0 <= score <= 100 else None


def _public_roles(text):
    """assistant_axis/judge.py parse_judge_score (line 68), restated."""
    if not text:
        return None
    numbers = re.findall(r"\b(\d+)\b", text.strip())
    if not numbers:
        return None
    score = int(numbers[0])
    return score if 0 <= score <= 3 else None


REPLIES = ["0", "3", "100", "101", "42", " 7\n", "Score: 85", "85/100", "-1", "2.5", "", None,
           "REFUSAL", "refusal", "The model's refusal... 90", "no number", "3 then 2",
           "score 4", "1000", "007", "x99y", "99", "Refusal"]


@pytest.mark.parametrize("reply", REPLIES)
def test_traits_parse_matches_public_script(reply):
    assert TRAITS.parse(reply) == _public_traits(reply)


@pytest.mark.parametrize("reply", REPLIES)
def test_roles_parse_matches_public_script(reply):
    assert ROLES.parse(reply) == _public_roles(reply)


def test_scale_edges_and_refusal():
    assert TRAITS.parse("REFUSAL") == REFUSAL
    assert ROLES.parse("REFUSAL") is None  # no REFUSAL on the 0-3 scale: 0 is a refusal
    assert TRAITS.parse("101") is None and ROLES.parse("4") is None
    assert TRAITS.parse("100") == 100 and ROLES.parse("0") == 0


def test_choices_all_parse_to_themselves():
    """Structured output restricted to ``choices`` can only give replies that parse."""
    assert len(TRAITS.choices) == 102 and TRAITS.choices[0] == REFUSAL
    assert ROLES.choices == ["0", "1", "2", "3"]
    for scale in (TRAITS, ROLES):
        for c in scale.choices:
            assert scale.parse(c) == (c if c == REFUSAL else int(c))


def test_published_temperatures():
    # 4_judge.py call_judge_model_single: temperature=0.0; assistant_axis/judge.py:111: 1
    assert TRAITS.temperature == 0.0 and ROLES.temperature == 1.0


def test_scale_for_kind():
    assert scale_for("traits") is TRAITS and scale_for("roles") is ROLES
    with pytest.raises(ValueError, match="no judge scale"):
        scale_for("emotions")


def test_prompt_fill_is_str_format_of_the_two_fields():
    template = "Q: {question}\nA: {answer}\nReply 0-3."
    assert judge_prompt(template, question="Why?", answer="Because {x}") == \
        template.format(question="Why?", answer="Because {x}")
