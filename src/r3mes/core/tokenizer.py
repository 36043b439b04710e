"""The tokenizer of a model directory: ``tokenizer.json`` via the ``tokenizers`` library.

Reads ``tokenizer_config.json`` (and ``special_tokens_map.json``) for the BOS/EOS/PAD
tokens, whether to prepend BOS, and the chat template (``chat_template`` there or a
``chat_template.jinja`` file), rendered with Jinja2 the way transformers does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from r3mes.errors import R3mesError

__all__ = ["Tokenizer", "TokenizerError"]


class TokenizerError(R3mesError, ValueError):
    """A tokenizer directory that cannot be used; the message names the file."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode text and render chat prompts for one model directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{tok_file}: missing (r3mes needs a tokenizers JSON file)")
        try:
            self._tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise TokenizerError(f"{tok_file}: cannot be read ({exc})") from None
        cfg: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = root / name
            if f.is_file():
                try:
                    data = json.loads(f.read_text())
                except json.JSONDecodeError as exc:
                    raise TokenizerError(f"{f}: not valid JSON ({exc})") from None
                if isinstance(data, dict):
                    cfg.update(data)
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.pad_token = _token_text(cfg.get("pad_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        template = cfg.get("chat_template")
        jinja = root / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; prepends BOS when the tokenizer config asks and the post-processor
        did not already."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the chat template.

        Raises TokenizerError if the tokenizer has no template.
        """
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template: {message}")

        # As transformers renders templates: sandboxed, trim/lstrip blocks, loop controls.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")
