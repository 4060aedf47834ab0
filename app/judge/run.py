"""Judging one persona's responses, and the artifacts that come out of it.

Per sample the judge gets the persona file's ``eval_prompt`` filled with the question and
the answer (:func:`app.judge.scales.judge_prompt`) as one user message, as the public
``3_judge.py`` (roles) and ``4_judge.py`` (traits) send it. Each reply ends as one outcome:

- ``scored``: a number on the scale;
- ``refusal``: the traits score ``"REFUSAL"`` (the judged model refused): a score, kept;
- ``unparseable``: no score in the reply (or one outside the scale);
- ``judge_refused``: the judge declined to judge (a refusal message, a content filter);
- ``malformed``: the server answered 200 with something that is not a chat completion;
- ``rejected``: the server refused this one request (400/413/422).

The first three replies' kinds and the malformed ones are asked again, ``reply_retries``
times at most; whatever is left is recorded with the reply text and counted. Nothing is
dropped silently: the detail artifact lists every sample. A whole persona of rejected
requests, or an endpoint still failing after the client's retries, raises (the stage item
fails or retries) rather than store an empty judgement.

Artifacts: ``<persona>.json`` in the public ``3_judge.py`` shape (sample key -> score, only
scores and ``"REFUSAL"``), ``<persona>.judge.json`` with every sample's outcome, reply,
attempts and tokens, and a ``judge_summary.json`` over the personas (:func:`summarize`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from app.judge.backend import (
    REQUESTS,
    JudgeBackend,
    JudgeRejected,
    MalformedReply,
    RequestRejected,
)
from app.judge.scales import REFUSAL, Scale, judge_prompt
from app.responses import Response

log = logging.getLogger(__name__)

OUTCOMES = ("scored", "refusal", "unparseable", "judge_refused", "malformed", "rejected")
RETRIED = frozenset({"unparseable", "judge_refused", "malformed"})
REPLY_CHARS = 500  # reply text kept per sample


@dataclass
class SampleJudgement:
    key: str
    outcome: str
    score: int | str | None
    reply: str | None
    attempts: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    usage_missing: int = 0  # replies without a token count (the server sent no usage)
    retried: list[str] = field(default_factory=list)  # outcomes of the earlier asks


@dataclass
class PersonaJudgement:
    persona: str
    scale: str
    model: str
    samples: list[SampleJudgement]
    requests: int  # HTTP requests sent, the client's own retries included
    usage_missing: int = 0
    meta: dict = field(default_factory=dict)

    def scores(self) -> dict[str, int | str]:
        """The public ``3_judge.py`` output: sample key -> score (or ``"REFUSAL"``)."""
        return {s.key: s.score for s in self.samples if s.outcome in ("scored", "refusal")}

    def counts(self) -> dict[str, int]:
        c = Counter(s.outcome for s in self.samples)
        return {o: c.get(o, 0) for o in OUTCOMES}

    def tokens(self) -> dict[str, int]:
        p = sum(s.prompt_tokens for s in self.samples)
        c = sum(s.completion_tokens for s in self.samples)
        return {"prompt": p, "completion": c, "total": p + c}

    def summary(self) -> dict:
        retried = Counter(o for s in self.samples for o in s.retried)
        return {"n_samples": len(self.samples), "requests": self.requests,
                "asks": sum(s.attempts for s in self.samples), "counts": self.counts(),
                "retried": {o: retried.get(o, 0) for o in sorted(RETRIED)},
                "tokens": self.tokens(), "usage_missing": self.usage_missing}

    def detail(self) -> dict:
        return {"persona": self.persona, "scale": self.scale, "judge_model": self.model,
                **self.meta, **self.summary(), "samples": [asdict(s) for s in self.samples]}


async def _judge_one(backend: JudgeBackend, scale: Scale, prompt: str, key: str,
                     reply_retries: int, structured: bool) -> SampleJudgement:
    """Ask until a reply parses or the retries are spent; the last outcome is the record,
    the earlier ones are kept in ``retried``."""
    history: list[str] = []
    tokens = [0, 0]
    usage_missing = 0
    for attempt in range(1, reply_retries + 2):
        try:
            reply = await backend.complete(prompt, choices=scale.choices if structured else None,
                                           temperature=scale.temperature)
        except MalformedReply as exc:
            last = SampleJudgement(key, "malformed", None, None, attempt, error=exc.message)
        except RequestRejected as exc:
            last = SampleJudgement(key, "rejected", None, None, attempt, error=exc.message)
            break
        else:
            tokens[0] += reply.prompt_tokens
            tokens[1] += reply.completion_tokens
            usage_missing += reply.usage_missing
            text = None if reply.text is None else reply.text[:REPLY_CHARS]
            score = None if reply.refused else scale.parse(reply.text)
            if reply.refused:
                last = SampleJudgement(key, "judge_refused", None, text, attempt)
            elif score is None:
                last = SampleJudgement(key, "unparseable", None, text, attempt)
            else:
                last = SampleJudgement(key, "refusal" if score == REFUSAL else "scored", score,
                                       text, attempt)
                break
        history.append(last.outcome)
    if last.outcome in RETRIED:
        history.pop()  # the record itself carries the last outcome
    last.retried = history
    last.prompt_tokens, last.completion_tokens = tokens
    last.usage_missing = usage_missing
    return last


async def judge_responses(backend: JudgeBackend, *, persona: str, eval_prompt: str,
                          scale: Scale, responses: Iterable[Response], reply_retries: int = 2,
                          structured: bool | None = None) -> PersonaJudgement:
    """Judge every response of one persona; concurrency is the backend's to bound."""
    responses = list(responses)
    if structured is None:
        structured = bool(getattr(backend, "structured_outputs", False))
    counter: dict = {"requests": 0}
    token = REQUESTS.set(counter)
    try:
        tasks = [asyncio.ensure_future(_judge_one(
            backend, scale, judge_prompt(eval_prompt, question=r.question, answer=r.answer),
            r.key, max(0, int(reply_retries)), structured)) for r in responses]
        try:
            samples = list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    finally:
        REQUESTS.reset(token)
    result = PersonaJudgement(
        persona=persona, scale=scale.name, model=backend.model, samples=samples,
        requests=counter["requests"],
        usage_missing=sum(s.usage_missing for s in samples),
        meta={"base_url": getattr(backend, "base_url", None),
              "structured_outputs": structured, "reply_retries": reply_retries})
    if samples and all(s.outcome == "rejected" for s in samples):
        raise JudgeRejected(f"the judge refused every request of persona {persona!r}: "
                            f"{samples[0].error}", field="judge",
                            hint="check the judge model and its context length")
    c = result.counts()
    log.info("judged %s: %d samples, %d requests, %s", persona, len(samples), result.requests,
             ", ".join(f"{k} {v}" for k, v in c.items() if v))
    return result


def judge_persona(backend_factory, **kw) -> PersonaJudgement:
    """Synchronous entry for workers: a fresh event loop and backend per call (an asyncio
    client must not outlive its loop)."""

    async def main():
        backend = backend_factory()
        try:
            return await judge_responses(backend, **kw)
        finally:
            await backend.aclose()

    return asyncio.run(main())


def summarize(judgements: Iterable[PersonaJudgement | dict], *, model: str | None = None,
              base_url: str | None = None) -> dict:
    """``judge_summary.json``: per persona and in total, requests, outcomes and tokens.
    Accepts judgements or their :meth:`PersonaJudgement.detail` dicts (read back from
    storage, so a resumed stage summarises personas judged by an earlier attempt)."""
    personas: dict[str, dict] = {}
    for j in judgements:
        d = j.detail() if isinstance(j, PersonaJudgement) else j
        personas[d["persona"]] = {k: d[k] for k in ("n_samples", "requests", "asks", "counts",
                                                    "retried", "tokens", "usage_missing")}
        model = model or d.get("judge_model")
        base_url = base_url or d.get("base_url")
    total: dict = {"n_samples": 0, "requests": 0, "asks": 0, "usage_missing": 0,
                   "counts": dict.fromkeys(OUTCOMES, 0),
                   "retried": dict.fromkeys(sorted(RETRIED), 0),
                   "tokens": {"prompt": 0, "completion": 0, "total": 0}}
    for p in personas.values():
        for k in ("n_samples", "requests", "asks", "usage_missing"):
            total[k] += p[k]
        for group in ("counts", "retried"):
            for k, v in p[group].items():
                total[group][k] = total[group].get(k, 0) + v
        for k, v in p["tokens"].items():
            total["tokens"][k] += v
    return {"judge_model": model, "base_url": base_url, "personas": personas, "total": total}
