"""validate_spec names the field for each kind of bad input; the wire format round-trips."""

from __future__ import annotations

import math

import pytest
import torch

from workers.engine.spec import (
    CaptureSpec,
    RequestSpec,
    Span,
    SpecError,
    SteerOp,
    as_specs,
    validate_spec,
)

H, L = 8, 4


def _check(spec: RequestSpec) -> None:
    validate_spec(spec, num_layers=L, hidden_size=H)


def _field(spec: RequestSpec) -> str:
    with pytest.raises(SpecError) as e:
        _check(spec)
    assert e.value.field in str(e.value)
    return e.value.field


def test_valid_spec_passes():
    _check(RequestSpec(steer=(SteerOp("add", 0, [1.0] * H, scale=2.0),
                              SteerOp("cap", 3, torch.ones(H), min=-1.0),
                              SteerOp("ablate", 1, [0.0] * (H - 1) + [1.0], scale=0.0)),
                       capture=CaptureSpec(layers=(0, 3), spans=(Span("r", 2, None),))))


@pytest.mark.parametrize("op,want", [
    (SteerOp("add", 0, [1.0] * (H + 1)), "steer[0].vector"),
    (SteerOp("add", 0, torch.ones(H - 1)), "steer[0].vector"),
    (SteerOp("add", 0, [1.0] * (H - 1) + [math.nan]), "steer[0].vector"),
    (SteerOp("add", 0, [1.0] * (H - 1) + [math.inf]), "steer[0].vector"),
    (SteerOp("cap", 0, [0.0] * H, max=1.0), "steer[0].vector"),
    (SteerOp("ablate", 0, torch.zeros(H)), "steer[0].vector"),
    (SteerOp("add", L, [1.0] * H), "steer[0].layer"),
    (SteerOp("add", -1, [1.0] * H), "steer[0].layer"),
    (SteerOp("scale", 0, [1.0] * H), "steer[0].op"),
    (SteerOp("add", 0, [1.0] * H, scale=math.nan), "steer[0].scale"),
    (SteerOp("cap", 0, [1.0] * H), "steer[0]"),
    (SteerOp("cap", 0, [1.0] * H, min=2.0, max=1.0), "steer[0].min"),
    (SteerOp("cap", 0, [1.0] * H, max=math.inf), "steer[0].max"),
])
def test_bad_ops_name_the_field(op, want):
    assert _field(RequestSpec(steer=(SteerOp("add", 1, [0.0] * H), op))) == want.replace(
        "[0]", "[1]")


def test_zero_vector_is_fine_for_add():
    _check(RequestSpec(steer=(SteerOp("add", 0, [0.0] * H),)))


@pytest.mark.parametrize("layers,want", [
    ((0, L), "capture.layers[1]"), ((-1,), "capture.layers[0]"),
    ((1, 1), "capture.layers"), ((), "capture.layers"),
])
def test_bad_capture_layers(layers, want):
    assert _field(RequestSpec(capture=CaptureSpec(layers=layers))) == want


@pytest.mark.parametrize("span", [Span("x", -1, 3), Span("x", 4, 4), Span("x", 5, 2)])
def test_bad_spans(span):
    assert _field(RequestSpec(capture=CaptureSpec(spans=(Span("ok", 0, 1), span)))) == \
        "capture.spans[1]"


def test_wire_round_trip():
    spec = RequestSpec(
        steer=(SteerOp("add", 1, torch.arange(H, dtype=torch.float32), scale=0.5),
               SteerOp("cap", 2, [1.0] * H, min=None, max=3.0),
               SteerOp("ablate", 0, [0.5] * H, scale=0.0)),
        capture=CaptureSpec(layers=(0, 2), prompt=False, last_prompt=False, raw=True,
                            spans=(Span("a", 0, 4), Span("b", 3, None))),
        key="pos_p0_q1")
    back = RequestSpec.from_wire(spec.to_wire())
    assert back.key == spec.key and back.capture == spec.capture
    assert back.steer[0].vector == [float(i) for i in range(H)]
    assert [(o.op, o.layer, o.scale, o.min, o.max) for o in back.steer] == \
        [(o.op, o.layer, o.scale, o.min, o.max) for o in spec.steer]
    assert back.to_wire() == spec.to_wire()
    assert RequestSpec.from_wire(RequestSpec().to_wire()) == RequestSpec()
    assert not RequestSpec().active and back.active


def test_as_specs_broadcasts_and_checks_length():
    s = RequestSpec(key="k")
    assert as_specs(s, 3) == [s, s, s] and as_specs(None, 2) == [None, None]
    with pytest.raises(SpecError) as e:
        as_specs([s], 2)
    assert e.value.field == "specs"


@pytest.mark.parametrize("name", ["prompt", "response", "last_prompt", "ok"])
def test_span_names_unique_and_not_reserved(name):
    spec = RequestSpec(capture=CaptureSpec(spans=(Span("ok", 0, 1), Span(name, 0, 2))))
    assert _field(spec) == "capture.spans[1].name"
