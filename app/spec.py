"""The job spec, declared once: what a job may ask for, with types, defaults and docs.

One pydantic model serves every side:
- the API's request body (:class:`JobSpec`, so OpenAPI documents every parameter and every
  steering-op field);
- submit validation (:mod:`app.submit` checks the *values* of what this model parsed, against
  the dataset and the model's shape, and stores only what was given);
- the worker (:class:`workers.params.JobParams` is this model with the worker's reading of a
  stored row), whose defaults are these defaults;
- the engine, through the dependency-free :mod:`jobspec` package this module builds on
  (steering-op fields and names, sampling defaults): the engine may not import ``app/``.

Adding a job parameter: a field here, and the code that reads it (see docs/extending.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from app.states import JobKind
from jobspec import sampling
from jobspec.steering import OPS, SteerOpSpec, VectorRef

KINDS: tuple[str, ...] = tuple(k.value for k in JobKind)  # the database's check constraint too
__all__ = ["KINDS", "OPS", "JobParams", "JobSpec", "SteerOpSpec", "VectorRef"]


class JobParams(BaseModel):
    """A job's parameters. Every field is optional; a value left out takes its default."""

    model_config = ConfigDict(extra="forbid")  # a typo like max_sample is refused, named

    layers: list[StrictInt] | Literal["all"] | None = Field(
        None, description="layers to capture: a list of indices or 'all' (default all)")
    max_samples: StrictInt | None = Field(
        None, description="keep only the first N samples of each persona, in prompt-major "
                          "order (a quick look: later prompts lose their questions and "
                          "pairs; to run fewer questions as the public scripts do, use "
                          "questions)")
    questions: StrictInt | None = Field(
        None, description="capture the first N shared questions (the public "
                          "--question_count; default all, 240 in the release)")
    personas: list[str] | None = Field(
        None, description="the personas to run (the public --roles); default all. The "
                          "default persona is captured once per capture job when the "
                          "dataset has one")
    model_name: str | None = Field(
        None, description="the name filled into {model_name} in prompts (default: from the "
                          "model id, as the public generator's short name: Qwen, Llama, ...)")
    axis_from: str | None = Field(
        None, description="a succeeded roles capture job of the same model: every persona's "
                          "vectors are projected on its assistant axis (axis.json)")
    batch_size: StrictInt | None = Field(sampling.BATCH_SIZE,
                                         description="samples in the engine at once: a memory cap "
                                         "(vLLM's scheduler batches them; default twice the "
                                         "engine's max_num_seqs); halved on OOM")
    max_tokens: StrictInt | None = Field(sampling.MAX_TOKENS,
                                         description="tokens generated per response")
    temperature: float | None = Field(sampling.TEMPERATURE,
                                      description="sampling temperature, >= 0 (0: greedy)")
    top_p: float | None = Field(sampling.TOP_P, description="nucleus sampling, in (0, 1]")
    seed: StrictInt | None = Field(None, description="sampling seed")
    steer: list[SteerOpSpec] | None = Field(None, description="rollout: steering ops")
    capture: StrictBool | None = Field(None, description="rollout: also store activations")
    spans: list[Literal["prompt", "last_prompt"]] | None = Field(
        None, description="per-sample means stored besides the response mean (default none): "
                          "prompt (the prompt-span mean), last_prompt (the last prompt "
                          "token); each adds as many bytes as the response means")
    capture_exact: StrictBool | None = Field(
        None, description="capture with prefix caching off for exact per-token rows")
    # the research pipeline (kind pipeline; see app/stages.py)
    judge: str | None = Field(
        None, max_length=300,
        description="judge model on the OpenAI-compatible endpoint CHATSPACE_JUDGE_BASE_URL: "
                    "runs generate -> capture -> judge -> vectors (-> axis for roles)")
    judge_structured_outputs: StrictBool | None = Field(
        None, description="restrict the judge's replies to the scale (vLLM servers only)")
    judge_reply_retries: StrictInt | None = Field(
        None, ge=0, le=10, description="extra asks for a reply that does not parse")
    responses: str | None = Field(
        None, max_length=300,
        description="capture (and judge) these responses instead of generating: the id of an "
                    "earlier rollout or pipeline job, or an uploads/ prefix in the store")
    stages: list[str] | None = Field(
        None, description="pipeline stages to run: generate, capture, judge, minilm, vectors, "
                          "axis (default: the chain the other params imply)")
    min_count: StrictInt | None = Field(
        None, ge=1, description="samples a vector needs (default: roles 50, traits 1)")
    sweep: dict[str, Any] | None = Field(
        None, description="rollout: a steering sweep (app/sweeps.py), either {source: JOB, "
                          "vector: NAME, layers, scales, normalize, persona} or {cap_axis: JOB, "
                          "cap_percentiles, layers}; checked at submit, grid size reported")

    def given(self) -> dict:
        """Only what the submitter wrote (no defaults, no nulls), as plain JSON values."""
        return self.model_dump(exclude_unset=True, exclude_none=True, by_alias=True)


class JobSpec(BaseModel):
    """A job as submitted: ``POST /jobs`` and ``chatspace-jobs submit``."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field("capture", description=" | ".join(KINDS))
    dataset: str = Field(..., description="a dataset name under the datasets root")
    model: str | None = Field(None, description="model name (default: settings.default_model)")
    dtype: str | None = Field(None, description="bfloat16 | float16 | float32")
    params: JobParams = Field(default_factory=JobParams)
