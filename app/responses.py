"""Given responses: the JSONL records the judge and the capture of given responses read.

Two line formats are accepted, because researchers hold both today:

- the public ``1_generate.py`` output (safety-research/assistant-axis
  ``assistant_axis/generation.py`` ``generate_for_role`` / persona-subspace
  ``traits/2_responses.py``): ``system_prompt``, ``prompt_index``, ``question_index``,
  ``question``, ``label`` and ``conversation`` (a list of chat messages whose first
  ``assistant`` message is the answer: ``3_judge.py`` and ``4_judge.py`` read it so);
- our rollout artifact lines (``workers/pipeline.py`` ``_rollout``): the same indices and
  ``label`` plus ``response`` and ``key``.

Given files travel to the artifact store (:func:`store_upload`, behind ``PUT
/uploads/responses/<upload id>/<persona>``): ``uploads/<upload id>/<persona>.jsonl``, the
upload id a digest of every file's name and content (:func:`upload_id`), and a job's
``params.responses`` names that folder.

Labels ``neutral`` are read as ``default``, as persona-subspace's ``4_judge.py``
(``organize_responses_by_question_and_label``) normalises them. A sample's key is
``"{label}_p{prompt_index}_q{question_index}"``, the key every public score and activation
file uses. Problems are collected with their line number and field, so one error message
lists everything wrong with a file before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from app.errors import SpecInvalid, UploadConflict, UploadTooLarge

LABELS = ("pos", "neg", "default")
UPLOADS = "uploads"  # the store's folder of given responses: uploads/<upload id>/<persona>.jsonl
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
PERSONA_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
MAX_UPLOAD_BYTES = 256 * 1024 * 1024  # one persona's file (1_generate.py: ~2 kB a sample)


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


def upload_id(files: dict[str, bytes]) -> str:
    """The name of an upload of responses files (persona -> content): a digest of every
    file's name and content, so the same files go to the same place and a retried upload
    rewrites nothing."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()[:32]


def upload_prefix(upload: str) -> str:
    return f"{UPLOADS}/{upload}"


def upload_key(upload: str, persona: str) -> str:
    return f"{upload_prefix(upload)}/{persona}.jsonl"


def store_upload(store, *, upload: str, persona: str, data: bytes) -> dict:
    """Check one persona's responses file and keep it where ``--responses uploads/<upload>``
    reads it. Raises :class:`SpecInvalid` naming the line and field of every problem, and
    :class:`UploadConflict` when that name already holds other content. Returns what was
    stored, with the number of samples."""
    if not UPLOAD_ID.match(upload):
        raise SpecInvalid(f"upload id {upload[:80]!r} is not 32 hex digits", field="upload_id",
                          hint="app.responses.upload_id(files) names an upload")
    if not PERSONA_NAME.match(persona):
        raise SpecInvalid(f"persona name {persona[:80]!r} is not a file name", field="persona",
                          hint="letters, digits, '_', '.', '-'; the file is <persona>.jsonl")
    source = f"{persona}.jsonl"
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadTooLarge(f"{source} is {len(data)} bytes", field=source,
                             hint=f"at most {MAX_UPLOAD_BYTES} bytes a persona")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SpecInvalid(f"{source} line {line}: not UTF-8 text", field=source,
                          hint="one JSON object a line in the 1_generate.py format") from None
    rows = parse_responses(text.splitlines(), source=source)
    key = upload_key(upload, persona)
    if store.exists(key) and not store.verify(key, hashlib.sha256(data).hexdigest()):
        raise UploadConflict(f"{key} already holds other content", field="upload_id",
                             hint="name an upload by upload_id(files) of its own files")
    obj = store.put_bytes(key, data, content_type="application/x-ndjson")
    return {"responses": upload_prefix(upload), "persona": persona, "key": obj.key,
            "sha256": obj.sha256, "size": obj.size, "samples": len(rows)}
