"""Post-processing of generated answers: safety filter, whitespace, citation injection.

One implementation serves both the streamed and the complete answer: :class:`Postprocessor`
is fed the decoded text piece by piece and emits text as soon as it is final, so the
concatenation of what a stream shows is exactly the complete answer (tested). A piece is
final once no blocked term can still straddle it: the last ``max(len(term)) + 1`` characters
are held back (the extra character decides the word boundary after a term), as is trailing
whitespace.

- **Safety** (:class:`SafetyFilter`): configurable blocked terms (case-insensitive, whole
  words, any script) are replaced by ``replacement``; every masked term is reported.
- **Citations**: the RAG sources are numbered ``[1] ... [n]`` in the prompt
  (:func:`r3mes.rag.build_prompt`). The answer's own ``[n]`` citations are resolved; a
  "Sources" block listing the cited sources (or, when the answer cites none, every retrieved
  source) is appended so a reader can always trace the context that was used.
- **Formatting**: leading and trailing whitespace are removed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class SafetyFilter:
    """Masks blocked terms in text.

    Args:
        blocked_terms: words or phrases (matched case-insensitively as whole words).
        replacement: what a blocked term becomes.
        enabled: ``False`` passes text through unchanged.
    """

    def __init__(self, blocked_terms: Sequence[str] = (), replacement: str = "[filtered]",
                 enabled: bool = True) -> None:
        terms = [t.strip() for t in blocked_terms if t and t.strip()]
        self.terms = sorted(set(terms), key=lambda t: (-len(t), t))
        self.replacement = replacement
        self.enabled = enabled and bool(self.terms)
        self.pattern: re.Pattern[str] | None = None
        if self.enabled:
            alternatives = "|".join(re.escape(t) for t in self.terms)
            # (?<!\w) / (?!\w) rather than \b so that terms that start or end with
            # punctuation still match as whole tokens.
            self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    @property
    def max_term_chars(self) -> int:
        return max((len(t) for t in self.terms), default=0)

    def apply(self, text: str) -> tuple[str, list[str]]:
        """``(masked text, masked terms in order)``."""
        if self.pattern is None:
            return text, []
        found: list[str] = []

        def sub(m: re.Match[str]) -> str:
            found.append(m.group(0))
            return self.replacement

        return self.pattern.sub(sub, text), found


def format_sources(sources: Sequence[Mapping[str, Any]], heading: str = "Sources") -> str:
    """The block appended to an answer: one ``[n] title (doc_id, index)`` line a source."""
    lines = [f"{heading}:"]
    for src in sources:
        label = src.get("title") or src.get("source") or src.get("doc_id")
        where = ", ".join(str(x) for x in (src.get("doc_id"), src.get("index")) if x)
        lines.append(f"[{src['number']}] {label}" + (f" ({where})" if where and where != label
                                                      else ""))
    return "\n".join(lines)


def cited_numbers(text: str, sources: Mapping[int, Any]) -> list[int]:
    """Source numbers the text cites as ``[n]``, in order of first citation; unknown ignored."""
    seen: list[int] = []
    for m in re.finditer(r"\[(\d{1,4})\]", text):
        n = int(m.group(1))
        if n in sources and n not in seen:
            seen.append(n)
    return seen


@dataclass
class PostprocessOutcome:
    """What post-processing did: the cited sources (``[{"number", "doc_id", ...}]``), the
    masked terms, and the appended sources block (empty when none)."""

    cited: list[dict[str, Any]] = field(default_factory=list)
    masked_terms: list[str] = field(default_factory=list)
    sources_block: str = ""


class Postprocessor:
    """Incremental post-processing of one answer.

    ``feed(piece)`` returns the text that became final; ``finish()`` returns the rest plus the
    sources block. ``outcome`` holds the cited sources and masked terms afterwards.

    Args:
        sources: ``number -> source`` from :func:`r3mes.rag.build_prompt` (may be empty).
        safety: the filter (``None``: no filtering).
        citations: append the sources block.
        strip_whitespace: drop leading and trailing whitespace.
    """

    def __init__(self, sources: Mapping[int, Mapping[str, Any]] | None = None, *,
                 safety: SafetyFilter | None = None, citations: bool = True,
                 strip_whitespace: bool = True) -> None:
        self.sources = {int(k): dict(v) for k, v in (sources or {}).items()}
        self.safety = safety if safety is not None and safety.enabled else None
        self.citations = citations
        self.strip_whitespace = strip_whitespace
        self.hold = self.safety.max_term_chars + 1 if self.safety else 0
        self.raw = ""           # everything received
        self._emitted_raw = 0   # raw characters already turned into output
        self._started = not strip_whitespace
        self.outcome = PostprocessOutcome()
        self.text = ""          # everything emitted

    def feed(self, piece: str) -> str:
        """Add decoded text; return what is final."""
        self.raw += piece
        return self._emit(final=False)

    def finish(self) -> str:
        """Flush the held-back text and append the sources block."""
        out = self._emit(final=True)
        if self.sources:  # which sources the answer cites is known even without the block
            numbers = cited_numbers(self.raw, self.sources)
            self.outcome.cited = [{"number": n, **self.sources[n]} for n in numbers]
        if self.citations and self.sources:
            listed = self.outcome.cited or [{"number": n, **s}
                                            for n, s in sorted(self.sources.items())]
            block = format_sources(listed)
            self.outcome.sources_block = block
            sep = "\n\n" if self.text or out else ""
            out += sep + block
            self.text += sep + block
        return out

    def _emit(self, final: bool) -> str:
        start = self._emitted_raw
        if not self._started:
            stripped = len(self.raw) - len(self.raw[start:].lstrip())
            if stripped == len(self.raw):
                self._emitted_raw = len(self.raw)
                return ""
            start = self._emitted_raw = stripped
            self._started = True
        end = len(self.raw)
        if self.strip_whitespace:
            end = len(self.raw.rstrip())  # trailing whitespace waits for more text
        if not final:
            end = min(end, len(self.raw) - self.hold)
        if end <= start:
            return ""
        segment_out = []
        cursor = start
        if self.safety is not None and self.safety.pattern is not None:
            for m in self.safety.pattern.finditer(self.raw, start):
                if m.start() >= end:
                    break
                if not final and m.end() > len(self.raw) - self.hold:
                    end = m.start()  # not decided yet: it may grow or stop matching
                    break
                segment_out.append(self.raw[cursor:m.start()])
                segment_out.append(self.safety.replacement)
                self.outcome.masked_terms.append(m.group(0))
                cursor = m.end()
                end = max(end, cursor)
        if end > cursor:
            segment_out.append(self.raw[cursor:end])
        self._emitted_raw = max(end, cursor)
        out = "".join(segment_out)
        self.text += out
        return out


def postprocess(text: str, sources: Mapping[int, Mapping[str, Any]] | None = None, *,
                safety: SafetyFilter | None = None, citations: bool = True,
                strip_whitespace: bool = True) -> tuple[str, PostprocessOutcome]:
    """Post-process a complete answer; the same result a stream of it produces."""
    proc = Postprocessor(sources, safety=safety, citations=citations,
                         strip_whitespace=strip_whitespace)
    out = proc.feed(text) + proc.finish()
    return out, proc.outcome
