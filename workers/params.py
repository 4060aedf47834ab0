"""A job's params as the worker reads them, and steering ops resolved to engine ops.

The params are the one job spec (:class:`app.spec.JobParams`: fields, types, defaults); this
module only reads a stored row into it (defaults filled in) and turns the steering ops into
the engine's own ``SteerOp`` dataclasses, resolving a ``from`` reference (a vector an
earlier capture job derived) through ``load_vector``. That conversion is the boundary the
engine's validation sits behind: the engine imports nothing of ``app/``.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ConfigDict, ValidationError

from app.errors import SpecInvalid
from app.spec import JobParams as JobSpecParams
from app.spec import SteerOpSpec
from workers.engine.spec import RequestSpec, SamplingOptions, SpecError, SteerOp, validate_spec


class JobParams(JobSpecParams):
    """The job spec's params with every default filled in, as the pipeline reads them."""

    # a stored row may carry keys of another version of the spec: ignored, not refused
    model_config = ConfigDict(extra="ignore")

    @classmethod
    def from_dict(cls, params: dict | None) -> JobParams:
        given = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            out = cls.model_validate(given)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
            raise SpecInvalid(first["msg"], field=f"params{where}") from None
        if out.batch_size is not None and out.batch_size < 1:
            raise SpecInvalid("must be at least 1", field="params.batch_size")
        if out.max_tokens < 1:
            raise SpecInvalid("must be at least 1", field="params.max_tokens")
        if out.max_samples is not None and out.max_samples < 1:
            raise SpecInvalid("must be at least 1 (omit it for all samples)",
                              field="params.max_samples")
        return out

    def as_dict(self) -> dict:
        """Every param with its value in effect (recorded with the artifacts)."""
        return self.model_dump(by_alias=True)

    def sampling_dict(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(**self.sampling_dict())


def resolve_steering(ops: list[SteerOpSpec] | None, *, persona: str, num_layers: int,
                     hidden_size: int,
                     load_vector: Callable[[str, str, str, int], list[float]] | None = None):
    """SteerOps for the engine, and the spec as recorded with each response (vectors from
    artifacts recorded by reference, inline vectors by their norm, to keep lines small)."""
    resolved, wire = [], []
    for i, op in enumerate(ops or []):
        where = f"params.steer[{i}]"
        if isinstance(op, dict):
            op = SteerOpSpec.model_validate(op)
        record = op.model_dump(by_alias=True, exclude_unset=True, exclude={"vector"})
        source = op.from_
        if source is not None:
            if load_vector is None:
                raise SpecInvalid("'from' needs a capture job's artifacts", field=f"{where}.from")
            layer = source.layer if source.layer is not None else op.layer
            vector = load_vector(source.job_id, source.persona or persona, source.vector, layer)
        elif op.vector is not None:
            vector = op.vector
            record["vector_norm"] = float(sum(float(x) ** 2 for x in vector) ** 0.5)
        else:
            raise SpecInvalid("give 'vector' (floats) or 'from' (a capture job's artifact)",
                              field=where)
        resolved.append(SteerOp(op=op.op, layer=op.layer, vector=vector, scale=op.scale,
                                min=op.min, max=op.max))
        wire.append(record)
    try:
        validate_spec(RequestSpec(steer=tuple(resolved)), num_layers=num_layers,
                      hidden_size=hidden_size)
    except SpecError as exc:
        raise SpecInvalid(exc.message, field=f"params.{exc.field}") from None
    return resolved, wire
