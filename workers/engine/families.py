"""Which vLLM decoder-layer classes the steering engine serves, and why only those.

The hooks read a decoder layer's output as ``(delta, residual)`` and take the hidden state
(transformers' ``hidden_states[i + 1]``) to be ``residual + delta``. A ``residual`` parameter
in the layer's signature proves nothing about that: on vLLM 0.32 ``CohereDecoderLayer`` (Cohere
and Cohere2), ``Exaone4DecoderLayer`` and ``PhiMoEDecoderLayer`` take one, ignore it, and return
(the layer's output stream, an earlier stream), so ``residual + delta`` counts part of the
stream twice (measured against transformers: relative error up to 0.78 for Cohere, 0.98 for
Exaone4). Hooks on such a layer start, fire and capture silently wrong numbers.

So the engine serves only the layer classes below, each covered by a parity test against
transformers on a tiny random model (``tests/engine/test_vllm_parity.py`` for the tiny
families, ``tests/engine/test_vllm_families.py`` for the rest), and refuses any other with an
:class:`~workers.engine.engine.EngineError` naming the class and the reason. An explicit
``allow_unverified_family`` lets an experiment run another family; the engine then records
the class in ``unverified_family`` and the service writes it into every artifact. The numeric
start-up check (:mod:`.contract`) runs either way, and refuses a layer whose output is not
the stream the next layer reads, whatever this list says.

Keyed by class name (``type(layer).__name__``): the same names on vLLM's CPU and CUDA builds.
"""

from __future__ import annotations

# layer class -> the model families / configs whose parity tests cover it
VERIFIED: dict[str, str] = {
    "Qwen2DecoderLayer": "qwen2",
    "Qwen3DecoderLayer": "qwen3",
    "LlamaDecoderLayer": "llama; llama3 rope scaling with tied embeddings; phi3",
    "MistralDecoderLayer": "mistral (sliding window)",
    "GemmaDecoderLayer": "gemma",
    "Gemma2DecoderLayer": "gemma2 (attention and final-logit soft-capping)",
    "Gemma3DecoderLayer": "gemma3",
    "Qwen2MoeDecoderLayer": "qwen2_moe",
    "Qwen3MoeDecoderLayer": "qwen3_moe",
}

# layer class -> what is known to be wrong with it (read in vLLM 0.32's model code)
KNOWN_WRONG: dict[str, str] = {
    "CohereDecoderLayer": (
        "it ignores the residual it is given and returns (layer output, layer input), so "
        "residual + delta would count the previous layer's stream twice"),
    "Exaone4DecoderLayer": (
        "it ignores the residual it is given and returns (layer output, stream after "
        "attention), so residual + delta would count part of the stream twice"),
    "PhiMoEDecoderLayer": (
        "it ignores the residual it is given and returns (layer output, stream after "
        "attention), so residual + delta would count part of the stream twice"),
}

SETTING = "allow_unverified_family"  # the engine argument; the service's CHATSPACE_ENGINE_ALLOW_UNVERIFIED_FAMILY


class UnverifiedFamily(Exception):
    """A decoder-layer class outside :data:`VERIFIED` (the engine re-raises it as an
    ``EngineError``; this module imports nothing of the engine so it stays testable alone)."""


def unverified(layer_classes: list[str]) -> list[str]:
    """The distinct classes among ``layer_classes`` that no parity test covers, in order."""
    seen: list[str] = []
    for name in layer_classes:
        if name not in VERIFIED and name not in seen:
            seen.append(name)
    return seen


def refusal(model_class: str, layer_class: str) -> str:
    """The message for a refused layer class: the class, the reason, the way out."""
    reason = KNOWN_WRONG.get(layer_class)
    why = (f"vLLM's {layer_class} does not return (delta, residual): {reason}" if reason else
           f"no parity test checks that {layer_class} returns (delta, residual) with "
           "residual + delta equal to the transformers hidden state")
    return (f"model {model_class}: decoder layer {layer_class} is not a verified family for "
            f"steering and capture ({why}). Verified layer classes: "
            f"{', '.join(sorted(VERIFIED))}. To run it anyway for an experiment, start the "
            f"engine with {SETTING}=True (service setting "
            "CHATSPACE_ENGINE_ALLOW_UNVERIFIED_FAMILY=true): every artifact then records "
            "unverified_family, and the start-up stream check still refuses a layer whose "
            "output is not the stream the next layer reads.")


def check(model_class: str, layer_classes: list[str], *, allow_unverified: bool) -> str | None:
    """``None`` when every layer class is verified; the unverified class name(s) when
    ``allow_unverified``; else raises :class:`UnverifiedFamily` naming the first one."""
    bad = unverified(layer_classes)
    if not bad:
        return None
    if not allow_unverified:
        raise UnverifiedFamily(refusal(model_class, bad[0]))
    return ",".join(bad)
