"""The prompt of one query: system prompt + numbered retrieved context + chat history +
the query, as token ids (through the model's chat template when its tokenizer has one)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from r3mes.serving.errors import InvalidRequestError

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def context_block(query: str, hits: Sequence[Any],
                  max_chars: int) -> tuple[str, dict[int, dict[str, Any]]]:
    """The numbered context for retrieval ``hits`` (best first, as many as fit in
    ``max_chars``, at least one) and the sources by their number."""
    from r3mes.rag import build_prompt

    kept, used = [], 0
    for hit in hits:
        if kept and used + len(hit.text) > max_chars:
            break
        kept.append(hit)
        used += len(hit.text)
    prompt, sources = build_prompt(query, kept)
    return prompt.rsplit("\n\nQuery: ", 1)[0], sources


def prompt_ids(tokenizer: Any, system_prompt: str, query: str, context: str | None,
               history: Sequence[Mapping[str, str]] | None) -> list[int]:
    """The token ids of the prompt (see :func:`render_prompt`)."""
    text, templated = render_prompt(tokenizer, system_prompt, query, context, history)
    # A rendered chat template carries its own special tokens (BOS, headers), as
    # transformers' apply_chat_template: encoded without adding any.
    return encode(tokenizer, text, add_special_tokens=not templated)


def render_prompt(tokenizer: Any, system_prompt: str, query: str, context: str | None,
                  history: Sequence[Mapping[str, str]] | None) -> tuple[str, bool]:
    """The prompt text and whether it is the model's chat template rendered: a model
    whose tokenizer has a chat template gets its messages (one system message holding
    the system prompt, the retrieved context and the caller's system turns; then the
    history; then the query) through it, others the plain ``Role: text`` layout.
    Raises :class:`InvalidRequestError` for an unknown role or a template that fails."""
    for turn in history or ():
        if str(turn.get("role")) not in ROLE_NAMES:
            raise InvalidRequestError(f"unknown chat role {turn.get('role')!r} "
                                      "(system, user or assistant)")
    # Any tokenizer with encode/decode serves; only some carry a chat template.
    if getattr(tokenizer, "chat_template", None):
        system = [system_prompt or "", context or ""]
        system += [str(t.get("content", "")) for t in history or ()
                   if t.get("role") == "system"]
        messages = [{"role": "system", "content": "\n\n".join(p for p in system if p)}]
        if not messages[0]["content"]:
            messages = []
        messages += [{"role": str(t["role"]), "content": str(t.get("content", ""))}
                     for t in history or () if t.get("role") != "system"]
        messages.append({"role": "user", "content": query})
        try:
            return tokenizer.apply_chat_template(messages), True
        except Exception as exc:  # a template that refuses these messages
            raise InvalidRequestError(f"the model's chat template failed: {exc}") from exc
    parts = []
    if system_prompt:
        parts.append(f"System: {system_prompt}")
    if context:
        parts.append(context)
    parts += [f"{ROLE_NAMES[str(t.get('role'))]}: {t.get('content', '')}" for t in history or ()]
    parts.append(f"User: {query}")
    parts.append("Assistant:")
    return "\n\n".join(parts), False


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids from an r3mes Tokenizer (a list) or a ``tokenizers.Tokenizer`` (an Encoding)."""
    out = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return [int(i) for i in getattr(out, "ids", out)]
