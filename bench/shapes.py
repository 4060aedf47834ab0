"""Real-size model shapes with random weights, for GPU benchmarks and GPU parity tests.

No weights can be downloaded anywhere this project runs, so a shape is a ``config.json`` (the
published architecture's sizes) plus the tiny Qwen3 tokenizer (its ids all fall inside the real
vocabulary). ``weights=False`` writes no weights: load it with ``load_format="dummy"``.
``weights=True`` writes random weights from a seed, so vLLM and transformers load the same
model (parity tests).

``tokenizer="wide"`` writes a word-level tokenizer with one token per id of the real vocabulary
instead (:func:`wide_tokenizer`): a random-weight model samples ids anywhere in 151,936, which
the tiny tokenizer (512 ids) decodes to nothing, so a job's exact re-read of the decoded
response would be a few tokens long. With the wide one every generated id decodes to a word
that encodes back to the same id: the re-read is as long as the generation (job benchmarks).
"""

from __future__ import annotations

import json
from pathlib import Path

SHAPES = {
    # name: (num_layers, hidden, heads, kv_heads, head_dim, intermediate, vocab)
    "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, 151936),
    "qwen3-8b": (36, 4096, 32, 8, 128, 12288, 151936),
    "qwen3-32b": (64, 5120, 64, 8, 128, 25600, 151936),
    # the tiny Qwen3's layers with the real vocabulary: checks the --shape path on a CPU
    "qwen3-tiny": (4, 128, 2, 1, 64, 256, 151936),
}


def wide_tokenizer(family: str, vocab_size: int):
    """A word-level tokenizer covering ``vocab_size`` ids: the family's special tokens, an
    unknown token (every prompt word the vocabulary lacks), then ``w<id>`` for every other id.
    Words split on whitespace and decode joined by spaces, so ``decode`` then ``encode`` gives
    the same ids back (special tokens aside, which decoding skips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from workers.engine.tiny import _CHATS, family_of

    chat = _CHATS[family_of(family)]
    specials = [t for t in (chat.bos, chat.eos, chat.pad) if t] + list(chat.extra)
    vocab = {t: i for i, t in enumerate(specials)}
    vocab["[UNK]"] = len(vocab)
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=chat.bos, eos_token=chat.eos, pad_token=chat.pad,
        unk_token="[UNK]", additional_special_tokens=list(chat.extra), model_max_length=8192)
    fast.chat_template = chat.template
    return fast


def write_shape(name: str, out_dir: Path, *, weights: bool = False, dtype: str = "bfloat16",
                device: str = "cpu", seed: int = 0, tokenizer: str = "tiny") -> Path:
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
    # without it vLLM loads a config-only (dummy) shape as a pooling model, which cannot generate
    config.architectures = ["Qwen3ForCausalLM"]
    tok = build_tokenizer("qwen3") if tokenizer == "tiny" else wide_tokenizer("qwen3", vocab)
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
    (out_dir / "shape.json").write_text(json.dumps({"shape": name, "weights": weights,
                                                    "tokenizer": tokenizer}))
    return out_dir
