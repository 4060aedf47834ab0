"""A steering op as a job asks for it: the one declaration of its fields, types and op names.

The API's request schema embeds :class:`SteerOpSpec` (so OpenAPI, and
``chatspace-jobs steer-spec --schema``, describe every field), submit validation checks the
values against the model's shape (:func:`app.submit.check_steer_op`), the worker resolves a
``from`` reference to a vector (:func:`workers.params.resolve_steering`) and hands the engine
its own ``SteerOp`` dataclasses (tensors allowed), whose op names come from :data:`OPS`.

Types only, no value rules: those need the model's shape and give field-naming hints, and
live with the code that knows the shape (submit, and the engine at its boundary).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

OpKind = Literal["add", "cap", "ablate"]
OPS: tuple[str, ...] = get_args(OpKind)  # the op names, in one place
DEFAULT_SCALE = 1.0


class _Strict(BaseModel):
    # strict: "1" is not a layer and true is not a scale; extra keys are typos, refused
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True,
                              allow_inf_nan=False)


class VectorRef(_Strict):
    """A vector derived by an earlier, succeeded capture job over the same model."""

    job_id: str = Field(..., description="the capture job's id")
    vector: str = Field(..., description="which derived vector: pos_neg, pos_default, contrast, ...")
    layer: int | None = Field(None, description="the captured layer to read (default: the op's)")
    persona: str | None = Field(None, description="whose vector (default: the item's persona)")


class SteerOpSpec(_Strict):
    """One steering op at one decoder layer, applied to the layer's output hidden state h:
    ``add`` h + scale·v; ``cap`` clamps the projection on v/|v| to [min, max];
    ``ablate`` scales that projection by ``scale`` (0 removes it). Give ``vector`` or
    ``from``."""

    op: OpKind = Field(..., description="add | cap | ablate")
    layer: int = Field(..., description="decoder layer index, 0-based")
    scale: float = Field(DEFAULT_SCALE, description="add: multiplier of v; ablate: kept share")
    min: float | None = Field(None, description="cap: lower bound of the projection")
    max: float | None = Field(None, description="cap: upper bound of the projection")
    vector: list[float] | None = Field(None, description="the direction, hidden_size floats")
    from_: VectorRef | None = Field(None, alias="from",
                                    description="take the direction from a capture job")


def schema() -> dict:
    """The JSON schema of one steering op (what ``steer-spec --schema`` prints)."""
    return SteerOpSpec.model_json_schema(by_alias=True)
