"""Real-size model shapes with random weights, for GPU benchmarks and GPU parity tests.

No weights can be downloaded anywhere this project runs, so a shape is a ``config.json`` (the
published architecture's sizes) plus the tiny Qwen3 tokenizer (its ids all fall inside the real
vocabulary). ``weights=False`` writes no weights: load it with ``load_format="dummy"``.
``weights=True`` writes random weights from a seed, so vLLM and transformers load the same
model (parity tests).
"""

from __future__ import annotations

import json
from pathlib import Path

SHAPES = {
    # name: (num_layers, hidden, heads, kv_heads, head_dim, intermediate, vocab)
    "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, 151936),
    "qwen3-8b": (36, 4096, 32, 8, 128, 12288, 151936),
    "qwen3-32b": (64, 5120, 64, 8, 128, 25600, 151936),
}


def write_shape(name: str, out_dir: Path, *, weights: bool = False, dtype: str = "bfloat16",
                device: str = "cpu", seed: int = 0) -> Path:
    from workers.engine.tiny import build_config, build_tokenizer

    layers, hidden, heads, kv, head_dim, inter, vocab = SHAPES[name]
    out_dir = Path(out_dir)
    if (out_dir / "shape.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    config = build_config("qwen3", num_layers=layers, hidden_size=hidden, num_heads=heads,
                          num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab,
                          intermediate_size=inter, max_position_embeddings=8192)
    config.initializer_range = 0.02
    tok = build_tokenizer("qwen3")
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    if weights:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.to(device).save_pretrained(out_dir, safe_serialization=True)
        del model
    else:
        config.dtype = dtype
        config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "shape.json").write_text(json.dumps({"shape": name, "weights": weights}))
    return out_dir
