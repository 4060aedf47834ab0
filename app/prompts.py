"""Chat prompts for persona samples, and the exact token span of the assistant's response.

Capture averages activations over the response tokens, so the span must be exact for every
chat template a researcher may use. We never guess from template names: we render the
template and compare.

Span convention (the public persona-subspace pipeline's): the response span runs from the
first token of the assistant's content to the end of the rendered conversation, i.e. the
content tokens plus the template's end-of-turn text (``<|im_end|>\\n``, ``<|eot_id|>``,
``<end_of_turn>\\n``). It never includes the generation prompt (``<|im_start|>assistant\\n``)
nor tags a template injects before the content (Qwen3's ``<think>\\n\\n</think>\\n\\n``).

Templates without a system role (Gemma 1/2 raise on one) get the system prompt folded into
the first user turn as ``"{system}\\n\\n{question}"``, as the public pipelines do; an empty
system prompt means no system message at all.

Tokenizers come from ``transformers``; nothing here imports it, so the API starts fast.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

_SENTINEL = "CHATSPACEresponseSENTINEL7f3a9c"  # survives strip() and trim
_system_role_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class PromptTokens:
    input_ids: list[int]  # prompt (+ response and end-of-turn when a response is given)
    prompt_len: int  # tokens of the prompt including the generation prompt
    response_span: tuple[int, int] | None  # [start, end) into input_ids; None without response
    text: str  # the rendered text that input_ids encode


def _render(tokenizer, messages: list[dict], *, generation: bool, kwargs: dict) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation, **kwargs
    )


def _encode(tokenizer, text: str) -> list[int]:
    # The template already wrote BOS and every special token into the text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generation_prompt(tokenizer, messages: list[dict], *,
                      template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a chat (``[{"role", "content"}]``) rendered by the model's template up
    to the assistant's turn: what a chat server generates from (the judge pool)."""
    return _encode(tokenizer, _render(tokenizer, messages, generation=True,
                                      kwargs=template_kwargs or {}))


def model_display_name(model: str) -> str:
    """The name ``{model_name}`` becomes in prompts (``You are {model_name}.``), chosen as
    the public generator chooses its short name (safety-research/assistant-axis
    ``assistant_axis/models.py`` lines 68-78): Gemma, Qwen, Llama or Mistral by family, else
    the model id's last path segment up to its first '-'. A job's ``model_name`` param
    overrides it."""
    lower = model.lower()
    for family, name in (("gemma", "Gemma"), ("qwen", "Qwen"), ("llama", "Llama"),
                         ("mistral", "Mistral")):
        if family in lower:
            return name
    return model.split("/")[-1].split("-")[0]


def supports_system_role(tokenizer) -> bool:
    """Whether the chat template renders a system message (Gemma 1/2 raise; some drop it)."""
    try:
        return _system_role_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    from jinja2.exceptions import TemplateError

    try:
        text = _render(tokenizer, [{"role": "system", "content": _SENTINEL},
                                   {"role": "user", "content": "hi"}], generation=True, kwargs={})
        ok = _SENTINEL in text
    except (TemplateError, ValueError):  # raise_exception(...) in the template
        ok = False
    try:
        _system_role_cache[tokenizer] = ok
    except TypeError:
        pass
    return ok


def default_template_kwargs(tokenizer) -> dict:
    """Qwen3-style templates: ask for the no-thinking prompt, as persona pipelines do."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "enable_thinking" in template:
        return {"enable_thinking": False}
    return {}


def build_messages(tokenizer, *, system: str | None, question: str) -> list[dict]:
    if not system:
        return [{"role": "user", "content": question}]
    if supports_system_role(tokenizer):
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return [{"role": "user", "content": f"{system}\n\n{question}"}]


def build_prompt(tokenizer, *, system: str | None, question: str, response: str | None = None,
                 template_kwargs: dict | None = None) -> PromptTokens:
    """Tokens of one sample; with ``response``, also where the response sits (see module doc).

    Raises ``ValueError`` when the template renders the prompt differently inside the full
    conversation than on its own: a span computed then would silently be wrong.
    """
    kwargs = default_template_kwargs(tokenizer) if template_kwargs is None else template_kwargs
    messages = build_messages(tokenizer, system=system, question=question)
    prompt_text = _render(tokenizer, messages, generation=True, kwargs=kwargs)
    prompt_ids = _encode(tokenizer, prompt_text)
    if response is None:
        return PromptTokens(prompt_ids, len(prompt_ids), None, prompt_text)

    # Where the content goes: render once with a sentinel to learn the text before it
    # (prompt + any injected tags) and after it (end of turn).
    marked = _render(tokenizer, messages + [{"role": "assistant", "content": _SENTINEL}],
                     generation=False, kwargs=kwargs)
    if marked.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not render the assistant content verbatim")
    head, tail = marked.split(_SENTINEL)
    full_text = _render(tokenizer, messages + [{"role": "assistant", "content": response}],
                        generation=False, kwargs=kwargs)
    if not (full_text.startswith(head) and full_text.endswith(tail)
            and len(full_text) >= len(head) + len(tail)):
        raise ValueError("the chat template renders the conversation around the response "
                         "differently from one response to another")
    if not head.startswith(prompt_text):
        raise ValueError("the generation prompt is not a prefix of the rendered conversation; "
                         "pass template_kwargs that make them agree (e.g. enable_thinking)")

    full_ids = _encode(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("prompt tokens differ inside the full conversation (a merge across "
                         "the prompt/response boundary); cannot place the response exactly")
    start = _boundary(tokenizer, full_text, full_ids, len(head))
    return PromptTokens(full_ids, len(prompt_ids), (start, len(full_ids)), full_text)


def _boundary(tokenizer, text: str, ids: list[int], char_pos: int) -> int:
    """Index of the first token of ``text[char_pos:]`` within ``ids``."""
    head_ids = _encode(tokenizer, text[:char_pos])
    if ids[: len(head_ids)] == head_ids:
        return len(head_ids)
    # A BPE merge crossed the boundary: take the token that covers the first content char.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        raise ValueError("tokenizer is not deterministic on the conversation text")
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if e > char_pos and e > s:
            return i
    return len(ids)
