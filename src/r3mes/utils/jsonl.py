"""JSON Lines input: every reader of user-supplied ``.jsonl`` files goes through here, so a
bad line is reported the same way everywhere (file, line number, what is wrong)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["jsonl_records"]


def jsonl_records(path: str | os.PathLike[str], lines: Iterable[str],
                  error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of ``lines`` (read from
    ``path``, named in errors). A line that is not JSON raises ``error`` as
    ``"<path>:<line>: malformed JSON (<reason>)"``. ``lines`` may be an open file: it is
    read lazily, so a large corpus is never held whole."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
