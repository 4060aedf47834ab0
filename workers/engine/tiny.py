"""Tiny random models of every supported family, built locally for tests and demos.

No weights can be downloaded on the machines this project runs on, so the engine's tests build
their own: real ``transformers`` architectures (the same classes vLLM maps to its model code)
at a toy size, random weights from a fixed seed, and a byte-level BPE tokenizer trained here on
a small English corpus, wrapped with the family's chat-template conventions. The sizes obey
what vLLM's CPU attention accepts (head_dim 64; head_dim 16 is rejected).

The service names them ``tiny:<family>`` (e.g. ``tiny:qwen3``); :func:`ensure_tiny_model`
builds one once under ``<models_dir>/tiny-<family>`` and reuses it afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jobspec.tiny import TINY_HIDDEN, TINY_LAYERS, TINY_PREFIX

FAMILIES = ("qwen2", "qwen3", "llama", "gemma", "gemma2", "gemma3")
# Built for the layer-contract tests (tests/engine/test_vllm_families.py): more verified
# layer classes and configs (sliding window, MoE, rope scaling with tied embeddings, binding
# soft-caps), and families the engine refuses (Cohere, Exaone4, PhiMoE) or serves only as
# unverified (GLM-4). Their chat templates are ChatML (Llama's for llama3): what these tests
# check is the layers' arithmetic, not the families' chat formats.
MORE_FAMILIES = ("mistral", "phi3", "qwen2_moe", "qwen3_moe", "llama3", "gemma2_softcap",
                 "cohere", "cohere2", "exaone4", "phimoe", "glm4")
_VLLM_ARCH = {"phimoe": "PhiMoEForCausalLM"}  # transformers saves PhimoeForCausalLM
_STAMP = "tiny_model.json"  # written last: a directory without it is an unfinished build
_FORMAT = 1  # bump when the build recipe changes so cached models are rebuilt

_CORPUS = """
The quick brown fox jumps over the lazy dog. A persona is a character an assistant plays.
You are a helpful assistant. Answer the question as honestly as you can, and explain why.
What is the capital of France? Paris is the capital of France, and Berlin is the capital
of Germany. How do you feel about the weather today? I think it will rain in the evening.
Please describe your favourite book and tell me what you learned from it. Numbers: 0 1 2 3
4 5 6 7 8 9 10 100 1000. Researchers study how language models represent traits such as
kindness, humour, honesty, curiosity, anger and fear. Steering adds a vector to the hidden
state of a layer; capture records the mean activation over the response tokens.
She said: "Hello, world!" and he replied, 'Good morning.' Why? Because it's true; isn't it?
Mathematics, science, history, music, art and philosophy are subjects people love to learn.
The model answered the user, then the user asked another question about the system prompt.
"""


@dataclass(frozen=True)
class _Chat:
    """A family's special tokens and chat template (Jinja, as in ``tokenizer_config.json``)."""

    bos: str | None
    eos: str
    pad: str
    extra: tuple[str, ...]
    template: str
    add_bos: bool


_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
)
_QWEN2_TEMPLATE = _CHATML + "{%- endif %}"
# Like the real Qwen3 template: with enable_thinking=False the generation prompt carries an
# empty think block, so the model answers directly.
_QWEN3_TEMPLATE = _CHATML + (
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
_LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
# Like the real Gemma template: no system role (it raises), roles must alternate.
_GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_QWEN = {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "add_bos": False}
_GEMMA = _Chat(bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True,
               extra=("<start_of_turn>", "<end_of_turn>"), template=_GEMMA_TEMPLATE)
_CHATS = {
    "qwen2": _Chat(**_QWEN, extra=("<|im_start|>",), template=_QWEN2_TEMPLATE),
    "qwen3": _Chat(**_QWEN, extra=("<|im_start|>", "<think>", "</think>"),
                   template=_QWEN3_TEMPLATE),
    "llama": _Chat(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>", add_bos=True,
                   extra=("<|start_header_id|>", "<|end_header_id|>"), template=_LLAMA_TEMPLATE),
    "gemma": _GEMMA, "gemma2": _GEMMA, "gemma3": _GEMMA,
}
_CHATS.update({f: _CHATS["qwen2"] for f in MORE_FAMILIES})
_CHATS.update(llama3=_CHATS["llama"], gemma2_softcap=_GEMMA)


def family_of(name: str) -> str:
    """``tiny:qwen3`` → ``qwen3``; raises ValueError naming the families for anything else."""
    family = name.removeprefix(TINY_PREFIX)
    if family not in FAMILIES and family not in MORE_FAMILIES:
        raise ValueError(f"model: unknown tiny model {name!r}; use tiny:<family> with family one "
                         f"of {', '.join(FAMILIES + MORE_FAMILIES)}")
    return family


def build_tokenizer(family: str, *, vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes) with the family's special tokens and
    chat template; every special token is a single id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    chat = _CHATS[family_of(family)]
    specials = [t for t in (chat.bos, chat.eos, chat.pad) if t] + list(chat.extra)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if chat.add_bos:
        bos_id = tok.token_to_id(chat.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{chat.bos} $A", pair=f"{chat.bos} $A $B", special_tokens=[(chat.bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=chat.bos, eos_token=chat.eos, pad_token=chat.pad,
        additional_special_tokens=list(chat.extra), model_max_length=2048)
    fast.chat_template = chat.template
    return fast


def build_config(family: str, *, num_layers: int = TINY_LAYERS,
                 hidden_size: int = TINY_HIDDEN,
                 num_heads: int = 2, num_kv_heads: int = 1, head_dim: int = 64,
                 vocab_size: int = 512, intermediate_size: int = 256,
                 max_position_embeddings: int = 2048):
    """The family's ``transformers`` config at toy size; sliding windows and soft-capping keep
    the family's own defaults, which vLLM supports."""
    import transformers as tf

    family = family_of(family)
    common = {"vocab_size": vocab_size, "hidden_size": hidden_size,
                  "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
                  "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
                  "head_dim": head_dim, "max_position_embeddings": max_position_embeddings,
                  "initializer_range": 0.05}
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(**common, tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if family == "gemma":
        return tf.GemmaConfig(**common)
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                   for i in range(num_layers)]
    if family == "gemma2":
        return tf.Gemma2Config(**common, query_pre_attn_scalar=head_dim, layer_types=layer_types)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, query_pre_attn_scalar=head_dim,
                                   layer_types=layer_types)
    return _more_config(tf, family, common, layer_types)


def _more_config(tf, family: str, common: dict, layer_types: list[str]):
    """Configs of :data:`MORE_FAMILIES`, each set so the feature it is there for is exercised
    at toy size (a window shorter than the test prompts, soft-caps that bind on activations
    of this scale, llama3 scaling with a short original context)."""
    untied = {**common, "tie_word_embeddings": False}
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
    if family == "mistral":
        return tf.MistralConfig(**untied, sliding_window=48)
    if family == "phi3":
        return tf.Phi3Config(**untied)
    if family == "qwen2_moe":  # layer 1 dense (mlp_only_layers): both MLP paths run
        return tf.Qwen2MoeConfig(**untied, **moe, shared_expert_intermediate_size=128,
                                 mlp_only_layers=[1])
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**untied, **moe, norm_topk_prob=True)
    if family == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        return tf.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=rope)
    if family == "gemma2_softcap":  # attention logits here are ~0.3, final logits ~0.6
        return tf.Gemma2Config(**common, query_pre_attn_scalar=common["head_dim"],
                               layer_types=layer_types, attn_logit_softcapping=0.5,
                               final_logit_softcapping=1.0)
    if family == "cohere":
        return tf.CohereConfig(**common)
    if family == "cohere2":
        return tf.Cohere2Config(**common, layer_types=layer_types)
    if family == "exaone4":
        return tf.Exaone4Config(**untied)
    if family == "phimoe":
        return tf.PhimoeConfig(**untied, num_local_experts=4, num_experts_per_tok=2)
    return tf.Glm4Config(**untied)


def build_tiny_model(family: str, out_dir: Path, *, seed: int = 0,
                     num_layers: int = TINY_LAYERS, hidden_size: int = TINY_HIDDEN,
                     num_heads: int = 2, num_kv_heads: int = 1, head_dim: int = 64, vocab_size: int = 512) -> Path:
    """Write a random ``family`` model (fp32 safetensors + tokenizer) to ``out_dir``.

    Deterministic for a given ``seed``. The directory is assembled in a sibling temp folder
    and renamed into place, so a crash never leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM

    family = family_of(family)
    out_dir = Path(out_dir)
    config = build_config(family, num_layers=num_layers, hidden_size=hidden_size,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          vocab_size=vocab_size)
    tokenizer = build_tokenizer(family, vocab_size=vocab_size)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if family in _VLLM_ARCH:  # vLLM registers the original checkpoint's spelling
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["architectures"] = [_VLLM_ARCH[family]]
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps({"family": family, "seed": seed, "format": _FORMAT,
                                              "num_layers": num_layers}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_tiny(name: str) -> bool:
    return name.startswith(TINY_PREFIX)


def ensure_tiny_model(name: str, models_dir: Path, *, seed: int = 0) -> Path:
    """Path of ``tiny:<family>`` under ``models_dir``, building it the first time (idempotent)."""
    family = family_of(name)
    out = Path(models_dir) / f"tiny-{family}"
    stamp = out / _STAMP
    if stamp.exists():
        meta = json.loads(stamp.read_text())
        if meta.get("format") == _FORMAT and meta.get("seed") == seed:
            return out
    return build_tiny_model(family, out, seed=seed)
