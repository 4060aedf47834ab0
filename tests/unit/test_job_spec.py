"""The one job spec: OpenAPI and ``chatspace-jobs steer-spec --schema`` describe the steering
ops from the same declaration, and its defaults are the worker's and the engine's."""

from __future__ import annotations

import json

from click.testing import CliRunner

from app.spec import JobParams, JobSpec
from jobspec import sampling
from workers.engine.spec import SamplingOptions
from workers.params import JobParams as WorkerParams


def test_steer_spec_schema_comes_from_the_job_spec():
    from cli.main import cli

    out = CliRunner().invoke(cli, ["steer-spec", "--schema"], obj={}, standalone_mode=False)
    assert out.exit_code == 0, out.output
    schema = json.loads(out.output)
    assert schema["properties"]["op"]["enum"] == ["add", "cap", "ablate"]
    assert {"op", "layer", "scale", "min", "max", "vector", "from"} <= set(schema["properties"])
    assert schema["required"] == ["op", "layer"]
    text = CliRunner().invoke(cli, ["steer-spec"], obj={}, standalone_mode=False).output
    assert "from.job_id" in text and "vector" in text


def test_openapi_schema_describes_steering_ops():
    defs = JobSpec.model_json_schema()["$defs"]
    assert defs["SteerOpSpec"]["properties"]["op"]["enum"] == ["add", "cap", "ablate"]
    assert "job_id" in defs["VectorRef"]["properties"]


def test_defaults_are_defined_once():
    worker = WorkerParams.from_dict({})
    engine = SamplingOptions()
    assert (worker.max_tokens, worker.temperature, worker.top_p, worker.batch_size) == (
        sampling.MAX_TOKENS, sampling.TEMPERATURE, sampling.TOP_P, sampling.BATCH_SIZE)
    assert (engine.max_tokens, engine.temperature, engine.top_p) == (
        sampling.MAX_TOKENS, sampling.TEMPERATURE, sampling.TOP_P)
    # what a submitter wrote is stored; defaults are not
    assert JobParams.model_validate({"max_tokens": 8}).given() == {"max_tokens": 8}
