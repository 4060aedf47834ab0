"""Reading given responses: the public 1_generate.py line format and our rollout lines.

Format: safety-research/assistant-axis ``assistant_axis/generation.py`` (HEAD) lines 292-296
(``system_prompt``, ``prompt_index``, ``question_index``, ``question``, ``conversation`` with
the assistant turn appended) and ``label`` (line 434); ``pipeline/3_judge.py`` takes the first
assistant message of ``conversation`` (lines 87-91) and keys ``{label}_p{p}_q{q}`` (line 93).
"""

from __future__ import annotations

import json

import pytest

from app.errors import SpecInvalid
from app.responses import parse_responses


def _public(label="pos", p=0, q=0, answer="Hi.", system="Be kind."):
    conv = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "How?"}, {"role": "assistant", "content": answer}]
    return json.dumps({"system_prompt": system, "prompt_index": p, "question_index": q,
                       "question": "How?", "label": label, "conversation": conv})


def test_public_format_and_rollout_lines():
    rollout = json.dumps({"key": "neg_p1_q2", "label": "neg", "prompt_index": 1,
                          "question_index": 2, "system_prompt": "", "question": "Why?",
                          "response": "No."})
    rs = parse_responses([_public(), rollout, "", _public("neutral", 0, 3, system="")])
    assert [r.key for r in rs] == ["pos_p0_q0", "neg_p1_q2", "default_p0_q3"]
    assert rs[0].answer == "Hi." and rs[0].system_prompt == "Be kind."
    assert rs[1].answer == "No." and rs[1].system_prompt == ""
    assert rs[0].public_record() == json.loads(_public())


def test_first_assistant_message_is_the_answer():
    rec = json.loads(_public())
    rec["conversation"].append({"role": "assistant", "content": "second"})
    assert parse_responses([json.dumps(rec)])[0].answer == "Hi."


def test_every_problem_named_with_line_and_field():
    bad = [_public(), "{not json", json.dumps({"label": "odd", "prompt_index": -1,
                                               "question_index": 0, "question": "q",
                                               "response": "r"}),
           json.dumps({"label": "pos", "prompt_index": 0, "question_index": 1,
                       "question": "q", "conversation": [{"role": "user", "content": "q"}]}),
           _public()]
    with pytest.raises(SpecInvalid) as e:
        parse_responses(bad, source="given.jsonl")
    msg = str(e.value)
    for part in ("given.jsonl line 2: not JSON", "line 3: field 'label'",
                 "line 3: field 'prompt_index'", "line 4: field 'conversation'",
                 "line 5: sample pos_p0_q0 already given on line 1"):
        assert part in msg
    assert e.value.field == "given.jsonl"


def test_empty_file_refused():
    with pytest.raises(SpecInvalid, match="no responses"):
        parse_responses(["", "  "])
