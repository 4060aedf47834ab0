"""The family allowlist and the stream probe, without vLLM: the probe on small torch decoder
stacks written the two ways vLLM writes its layers.

``FusedLayer`` is vLLM's Llama/Qwen layer (``vllm/model_executor/models/llama.py``,
``LlamaDecoderLayer.forward``: ``input_layernorm(hidden_states, residual)`` adds the pair
then normalizes, and the layer returns ``(mlp output, residual)``). ``IgnoresResidualLayer``
is vLLM 0.32's Cohere layer (``commandr.py``, ``CohereDecoderLayer.forward``: ``residual =
hidden_states`` first, returns ``(residual + attention + mlp, residual)``). The probe must pass
the first and catch the second at every layer boundary.
"""

from __future__ import annotations

import pytest
import torch

from workers.engine import families
from workers.engine.contract import StreamProbe, tolerance

H = 16


class AddNorm(torch.nn.Module):
    """vLLM's RMSNorm: with a residual it adds first and returns (normed, sum), in place."""

    def forward(self, x, residual=None):
        if residual is not None:
            residual.add_(x)  # vLLM's fused_add_rms_norm writes into its inputs
            x = residual
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed if residual is None else (normed, residual)


class FusedLayer(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(H, H, generator=g) / H ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(H, H, generator=g) / H ** 0.5)
        self.norm1, self.norm2 = AddNorm(), AddNorm()

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states.clone()
            hidden_states = self.norm1(hidden_states)
        else:
            hidden_states, residual = self.norm1(hidden_states, residual)
        hidden_states = torch.tanh(hidden_states @ self.w1)
        hidden_states, residual = self.norm2(hidden_states, residual)
        return torch.tanh(hidden_states @ self.w2), residual


class IgnoresResidualLayer(FusedLayer):
    def forward(self, positions, hidden_states, residual):
        residual = hidden_states
        normed = self.norm1(hidden_states)
        return residual + torch.tanh(normed @ self.w1) + torch.tanh(normed @ self.w2), residual


class Stack(torch.nn.Module):
    """vLLM's model loop: ``hidden_states, residual = layer(positions, hidden_states,
    residual)``, then ``norm(hidden_states, residual)``."""

    def __init__(self, layer_cls, n: int = 4):
        super().__init__()
        self.layers = torch.nn.ModuleList(layer_cls(seed=i) for i in range(n))
        self.norm = AddNorm()

    def forward(self, x):
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(None, hidden, residual)
        return self.norm(hidden, residual)[0]


@pytest.mark.parametrize(("layer_cls", "ok"), [(FusedLayer, True), (IgnoresResidualLayer, False)])
def test_probe_tells_the_two_contracts_apart(layer_cls, ok):
    model = Stack(layer_cls)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(x)
        probe = StreamProbe(list(model.layers), model.norm)
        probed = model(x)
        report = probe.remove()
        again = model(x)
    # The probe runs on copies: the real forward is untouched, and removing it leaves no hook.
    torch.testing.assert_close(probed, plain, rtol=0, atol=0)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    assert set(report["worst"]) == {"layer 1", "layer 2", "layer 3", "the final norm"}
    assert report["errors"] == {}
    assert report["producer"]["layer 1"] == (0, layer_cls.__name__)
    layers = [report["worst"][f"layer {j}"] for j in (1, 2, 3)]
    if ok:
        assert max(report["worst"].values()) < 1e-5 < tolerance("float32")
    else:  # every layer boundary is caught (the final norm here is the fused one: it passes)
        assert min(layers) > 0.5 > tolerance("bfloat16")
        assert report["worst"]["the final norm"] < 1e-5


def test_probe_reports_a_layer_it_cannot_read():
    class NoResidual(torch.nn.Module):
        def forward(self, positions, hidden_states):
            return hidden_states * 2, hidden_states

    class Loop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([NoResidual(), NoResidual()])

        def forward(self, x):
            for layer in self.layers:
                x, _ = layer(None, x)
            return x

    model = Loop()
    probe = StreamProbe(list(model.layers), None)
    model(torch.ones(2, H))
    report = probe.remove()
    assert "no (hidden_states, residual) tensors" in report["errors"]["layer 1"]


def test_verified_classes_pass_and_others_are_refused_naming_class_and_reason():
    assert families.check("Qwen3MoeForCausalLM", ["Qwen3MoeDecoderLayer"],
                          allow_unverified=False) is None
    with pytest.raises(families.UnverifiedFamily) as err:
        families.check("Exaone4ForCausalLM", ["Exaone4DecoderLayer"], allow_unverified=False)
    msg = str(err.value)
    assert msg.startswith("model Exaone4ForCausalLM: decoder layer Exaone4DecoderLayer is not a "
                          "verified family for steering and capture (vLLM's Exaone4DecoderLayer "
                          "does not return (delta, residual): it ignores the residual")
    assert "CHATSPACE_ENGINE_ALLOW_UNVERIFIED_FAMILY=true" in msg
    with pytest.raises(families.UnverifiedFamily, match="no parity test checks that "
                       "Glm4DecoderLayer returns"):
        families.check("Glm4ForCausalLM", ["Glm4DecoderLayer"], allow_unverified=False)
    # Mixed stacks: every class must be verified; the override names all the others.
    assert families.check("M", ["LlamaDecoderLayer", "Glm4DecoderLayer", "X", "Glm4DecoderLayer"],
                          allow_unverified=True) == "Glm4DecoderLayer,X"
