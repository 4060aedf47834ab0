"""Prompt building and exact response spans across chat-template families.

The tokenizers are built here (byte-level BPE with a few merges, special tokens per family)
with templates that reproduce the structure of the real ones: ChatML (Qwen2), Llama-3
(BOS in the template, trimmed content), Gemma (no system role: raises), Qwen3 (thinking tags
injected before the last assistant turn; ``enable_thinking=False`` adds them to the prompt).
"""

from __future__ import annotations

import pytest

from app.prompts import build_prompt, supports_system_role

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = m['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
QWEN3 = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{%- set content = m.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}{%- if loop.last %}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + content.lstrip('\n') + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)
MERGES = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("in", "g"), ("e", "r"),
          ("o", "u"), ("Ġ", "a")]


def make_tokenizer(template: str, specials: list[str], *, bos="<bos>", eos="<eos>",
                   merges=MERGES, use_regex=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   additional_special_tokens=specials)
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def chatml():
    return make_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def llama3():
    return make_tokenizer(LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                          bos="<|begin_of_text|>", eos="<|eot_id|>")


@pytest.fixture(scope="module")
def gemma():
    return make_tokenizer(GEMMA, ["<start_of_turn>", "<end_of_turn>"])


@pytest.fixture(scope="module")
def qwen3():
    return make_tokenizer(QWEN3, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"])


def dec(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def check_span(tok, pt, *, content: str, tail: str):
    s, e = pt.response_span
    assert e == len(pt.input_ids)
    assert dec(tok, pt.input_ids[s:e]) == content + tail
    assert dec(tok, pt.input_ids) == pt.text
    assert pt.input_ids[s:e] == tok(content + tail, add_special_tokens=False)["input_ids"]
    assert dec(tok, pt.input_ids[:s]) + content + tail == pt.text


def test_chatml_system_and_span(chatml):
    assert supports_system_role(chatml)
    p = build_prompt(chatml, system="Be a pirate.", question="Where is the gold?")
    assert p.text == ("<|im_start|>system\nBe a pirate.<|im_end|>\n<|im_start|>user\n"
                      "Where is the gold?<|im_end|>\n<|im_start|>assistant\n")
    assert p.response_span is None and p.prompt_len == len(p.input_ids)
    full = build_prompt(chatml, system="Be a pirate.", question="Where is the gold?",
                        response="Buried on the island, arr.")
    assert full.input_ids[: full.prompt_len] == p.input_ids
    assert full.response_span[0] == p.prompt_len
    check_span(chatml, full, content="Buried on the island, arr.", tail="<|im_end|>\n")


def test_empty_system_prompt_means_no_system_message(chatml):
    for system in (None, ""):
        p = build_prompt(chatml, system=system, question="Hi?")
        assert p.text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_bos_once_and_trimmed_content(llama3):
    full = build_prompt(llama3, system="You are terse.", question="Tides?",
                        response="  The moon pulls the sea.  ")
    assert full.text.count("<|begin_of_text|>") == 1
    assert full.input_ids.count(llama3.convert_tokens_to_ids("<|begin_of_text|>")) == 1
    assert full.response_span[0] == full.prompt_len
    check_span(llama3, full, content="The moon pulls the sea.", tail="<|eot_id|>")


def test_gemma_folds_system_into_user_turn(gemma):
    assert not supports_system_role(gemma)
    full = build_prompt(gemma, system="You are a scribe.", question="What is ink?",
                        response="Soot and gum, good brother.")
    assert "<start_of_turn>user\nYou are a scribe.\n\nWhat is ink?<end_of_turn>\n" in full.text
    assert "system" not in full.text
    assert full.response_span[0] == full.prompt_len
    check_span(gemma, full, content="Soot and gum, good brother.", tail="<end_of_turn>\n")


def test_qwen3_no_thinking_prompt_holds_the_tags(qwen3):
    p = build_prompt(qwen3, system="Be kind.", question="Why do cats purr?")
    assert p.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    full = build_prompt(qwen3, system="Be kind.", question="Why do cats purr?",
                        response="They are content, mostly.")
    assert full.response_span[0] == full.prompt_len == len(p.input_ids)
    check_span(qwen3, full, content="They are content, mostly.", tail="<|im_end|>\n")


def test_qwen3_thinking_tags_injected_are_excluded_from_span(qwen3):
    full = build_prompt(qwen3, system="Be kind.", question="Why do cats purr?",
                        response="They are content.", template_kwargs={})
    s, _ = full.response_span
    assert s > full.prompt_len
    assert dec(qwen3, full.input_ids[:full.prompt_len]).endswith("<|im_start|>assistant\n")
    assert dec(qwen3, full.input_ids[full.prompt_len:s]) == "<think>\n\n</think>\n\n"
    check_span(qwen3, full, content="They are content.", tail="<|im_end|>\n")


def test_merge_across_prompt_boundary_is_refused():
    # No regex pre-split: "\n" and the first letter of the response merge into one token,
    # so the prompt tokens are not a prefix of the conversation tokens.
    tok = make_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"],
                         merges=MERGES + [("Ċ", "H")], use_regex=False)
    with pytest.raises(ValueError, match="prompt tokens differ"):
        build_prompt(tok, system=None, question="Hi", response="Hello")


def test_template_that_silently_drops_system_gets_it_folded():
    dropping = (
        "{% for m in messages %}{% if m['role'] != 'system' %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = make_tokenizer(dropping, ["<|im_start|>", "<|im_end|>"])
    assert not supports_system_role(tok)
    p = build_prompt(tok, system="Be brief.", question="Why?")
    assert p.text == "<|im_start|>user\nBe brief.\n\nWhy?<|im_end|>\n<|im_start|>assistant\n"
