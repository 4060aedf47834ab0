"""Given responses: the JSONL records the judge and the capture of given responses read.

Two line formats are accepted, because researchers hold both today:

- the public ``1_generate.py`` output (safety-research/assistant-axis
  ``assistant_axis/generation.py`` ``generate_for_role`` / persona-subspace
  ``traits/2_responses.py``): ``system_prompt``, ``prompt_index``, ``question_index``,
  ``question``, ``label`` and ``conversation`` (a list of chat messages whose first
  ``assistant`` message is the answer: ``3_judge.py`` and ``4_judge.py`` read it so);
- our rollout artifact lines (``workers/pipeline.py`` ``_rollout``): the same indices and
  ``label`` plus ``response`` and ``key``.

Labels ``neutral`` are read as ``default``, as persona-subspace's ``4_judge.py``
(``organize_responses_by_question_and_label``) normalises them. A sample's key is
``"{label}_p{prompt_index}_q{question_index}"``, the key every public score and activation
file uses. Problems are collected with their line number and field, so one error message
lists everything wrong with a file before anything runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from app.errors import SpecInvalid

LABELS = ("pos", "neg", "default")


@dataclass(frozen=True)
class Response:
    key: str
    label: str
    prompt_index: int
    question_index: int
    system_prompt: str  # "" = no system prompt
    question: str
    answer: str

    def public_record(self) -> dict:
        """The line ``1_generate.py`` would have written for this sample."""
        conversation = ([{"role": "system", "content": self.system_prompt}]
                        if self.system_prompt else [])
        conversation += [{"role": "user", "content": self.question},
                         {"role": "assistant", "content": self.answer}]
        return {"system_prompt": self.system_prompt, "prompt_index": self.prompt_index,
                "question_index": self.question_index, "question": self.question,
                "label": self.label, "conversation": conversation}


def sample_key(label: str, prompt_index: int, question_index: int) -> str:
    return f"{label}_p{prompt_index}_q{question_index}"


def _index(rec: dict, name: str, where: str, problems: list[str]) -> int | None:
    value = rec.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append(f"{where}: field '{name}' must be an integer >= 0, got {value!r}"[:300])
        return None
    return value


def _answer(rec: dict, where: str, problems: list[str]) -> str | None:
    if "conversation" in rec:
        conv = rec["conversation"]
        if not isinstance(conv, list):
            problems.append(f"{where}: field 'conversation' must be a list of messages")
            return None
        for msg in conv:
            if isinstance(msg, dict) and msg.get("role") == "assistant":
                content = msg.get("content")
                if isinstance(content, str):
                    return content
                break
        problems.append(f"{where}: field 'conversation' has no assistant message with text "
                        "content (the answer to judge)")
        return None
    if isinstance(rec.get("response"), str):
        return rec["response"]
    problems.append(f"{where}: needs 'conversation' (1_generate.py format) or 'response' "
                    "(a rollout artifact line)")
    return None


def _system(rec: dict) -> str:
    if isinstance(rec.get("system_prompt"), str):
        return rec["system_prompt"]
    for msg in rec.get("conversation") or []:
        if isinstance(msg, dict) and msg.get("role") == "system":
            return str(msg.get("content") or "")
    return ""


def parse_responses(lines: Iterable[str | bytes], *, source: str = "responses") -> list[Response]:
    """Every record of a responses JSONL; raises :class:`SpecInvalid` listing each bad line."""
    out: list[Response] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.strip():
            continue
        where = f"{source} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not JSON ({exc.msg})")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{where}: must be a JSON object")
            continue
        label = rec.get("label")
        label = "default" if label == "neutral" else label
        if label not in LABELS:
            problems.append(f"{where}: field 'label' must be one of {', '.join(LABELS)}, "
                            f"got {label!r}"[:300])
        pi = _index(rec, "prompt_index", where, problems)
        qi = _index(rec, "question_index", where, problems)
        question = rec.get("question")
        if not isinstance(question, str) or not question:
            problems.append(f"{where}: field 'question' must be the question's text")
        answer = _answer(rec, where, problems)
        if None in (pi, qi, answer) or label not in LABELS or not isinstance(question, str):
            continue
        key = sample_key(label, pi, qi)
        if key in seen:
            problems.append(f"{where}: sample {key} already given on line {seen[key]}")
            continue
        seen[key] = n
        out.append(Response(key=key, label=label, prompt_index=pi, question_index=qi,
                            system_prompt=_system(rec), question=question, answer=answer))
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise SpecInvalid(f"{len(problems)} problem(s): {shown}{more}", field=source,
                          hint="one JSON object a line in the 1_generate.py format")
    if not out:
        raise SpecInvalid("no responses in the file", field=source,
                          hint="one JSON object a line in the 1_generate.py format")
    return out
