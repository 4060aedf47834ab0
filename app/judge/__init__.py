"""The LLM judge stage: published scales, prompt fill-in, an OpenAI-compatible backend and
the per-persona judgement with its artifacts. See :mod:`app.judge.run`."""

from app.judge.backend import (
    JudgeBackend,
    JudgeRejected,
    JudgeUnavailable,
    OpenAIBackend,
    Reply,
)
from app.judge.run import PersonaJudgement, judge_persona, judge_responses, summarize
from app.judge.scales import REFUSAL, ROLES, TRAITS, Scale, judge_prompt, scale_for

__all__ = ["REFUSAL", "ROLES", "TRAITS", "JudgeBackend", "JudgeRejected", "JudgeUnavailable",
           "OpenAIBackend", "PersonaJudgement", "Reply", "Scale", "judge_persona",
           "judge_prompt", "judge_responses", "scale_for", "summarize"]
