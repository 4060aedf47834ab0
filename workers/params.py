"""A job's params as the pipeline reads them, and steering specs resolved to engine ops.

Params (all optional): ``layers`` (list, default all), ``max_samples`` (per persona),
``batch_size`` (default 16), ``max_tokens`` (default 64), ``temperature`` (default 0),
``top_p``, ``seed``, ``steer`` (rollout: list of ops) and ``capture`` (rollout: also store
activations). A steering op is ``{"op": "add"|"cap"|"ablate", "layer": L, "scale": s,
"min": ..., "max": ...}`` plus either ``"vector": [floats]`` or ``"from": {"job_id": J,
"vector": "pos_neg", "layer": L2 (default L), "persona": P (default: the item's persona)}``
taking the vector from an earlier capture job's artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from app.errors import SpecInvalid


@dataclass
class JobParams:
    layers: list[int] | None = None
    max_samples: int | None = None
    batch_size: int = 16
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    steer: list[dict] = field(default_factory=list)
    capture: bool = False

    @classmethod
    def from_dict(cls, params: dict | None) -> JobParams:
        p = dict(params or {})
        known = {f for f in cls.__dataclass_fields__}
        out = cls(**{k: v for k, v in p.items() if k in known and v is not None})
        if out.batch_size < 1:
            raise SpecInvalid("must be at least 1", field="params.batch_size")
        if out.max_tokens < 1:
            raise SpecInvalid("must be at least 1", field="params.max_tokens")
        if out.max_samples is not None and out.max_samples < 1:
            raise SpecInvalid("must be at least 1 (omit it for all samples)",
                              field="params.max_samples")
        return out

    def as_dict(self) -> dict:
        return asdict(self)

    def sampling_dict(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}

    def sampling(self):
        from workers.engine.spec import SamplingOptions

        return SamplingOptions(**self.sampling_dict())


def resolve_steering(ops: list[dict], *, persona: str, num_layers: int, hidden_size: int,
                     load_vector: Callable[[str, str, str, int], list[float]] | None = None):
    """SteerOps for the engine, and the spec as recorded with each response (vectors from
    artifacts recorded by reference, inline vectors by their norm, to keep lines small)."""
    from workers.engine.spec import RequestSpec, SpecError, SteerOp, validate_spec

    resolved, wire = [], []
    for i, raw in enumerate(ops or []):
        where = f"params.steer[{i}]"
        if not isinstance(raw, dict) or "op" not in raw or "layer" not in raw:
            raise SpecInvalid("needs 'op' and 'layer'", field=where)
        source = raw.get("from")
        if source is not None:
            if load_vector is None or "job_id" not in source or "vector" not in source:
                raise SpecInvalid("'from' needs job_id and vector", field=f"{where}.from")
            vector = load_vector(str(source["job_id"]), source.get("persona") or persona,
                                 str(source["vector"]), int(source.get("layer", raw["layer"])))
            record = {k: v for k, v in raw.items() if k != "vector"}
        elif "vector" in raw:
            vector = raw["vector"]
            record = {k: v for k, v in raw.items() if k != "vector"}
            record["vector_norm"] = float(sum(float(x) ** 2 for x in vector) ** 0.5)
        else:
            raise SpecInvalid("give 'vector' (floats) or 'from' (a capture job's artifact)",
                              field=where)
        resolved.append(SteerOp(op=raw["op"], layer=int(raw["layer"]), vector=vector,
                                scale=float(raw.get("scale", 1.0)), min=raw.get("min"),
                                max=raw.get("max")))
        wire.append(record)
    try:
        validate_spec(RequestSpec(steer=tuple(resolved)), num_layers=num_layers,
                      hidden_size=hidden_size)
    except SpecError as exc:
        raise SpecInvalid(exc.message, field=f"params.{exc.field}") from None
    return resolved, wire
