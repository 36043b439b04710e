"""Documents in, token-bounded chunks out.

Chunks are measured in the word pieces of the embedding model's own tokenizer (MiniLM's
``tokenizer.json``, read with the ``tokenizers`` library), so a chunk of ``max_tokens`` is what
the embedder actually sees. Chunks end on sentence boundaries where a sentence fits; consecutive
chunks share about ``overlap`` tokens of whole trailing sentences so a fact cut by a boundary is
still retrievable from one side. A single sentence longer than ``max_tokens`` is split on token
offsets.

Loaders read plain text (``.txt``), Markdown (``.md``: headings become hard boundaries and the
section title is kept in the chunk metadata) and JSONL (one object a line with a ``text`` field).
Every loader refuses binary, empty, oversized and malformed input with an error naming the file
(and the line, for JSONL).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from r3mes.rag.errors import DocumentError
from r3mes.utils.jsonl import jsonl_records

DEFAULT_MAX_TOKENS = 512
DEFAULT_OVERLAP = 50
# 32 MiB of text is far beyond any single help page, article or book; a larger file is more
# likely a mistake (a dump, a binary) and would hold the whole corpus in memory at once.
DEFAULT_MAX_FILE_BYTES = 32 * 1024 * 1024
TEXT_SUFFIXES = {".txt", ".text", ".rst", ""}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}

# A sentence ends at . ! ? … (optionally followed by closing quotes/brackets) and whitespace,
# or at a line break. Abbreviations are sometimes split; that only costs a slightly earlier cut.
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|\n+")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Document:
    """A unit of source text. ``doc_id`` is unique within an index."""

    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: ``position`` is its 0-based order within the document;
    ``start``/``end`` are character offsets into the document text."""

    doc_id: str
    position: int
    text: str
    start: int
    end: int
    n_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_id(self) -> str:
        return f"{self.doc_id}#{self.position}"


@lru_cache(maxsize=2)
def _load_tokenizer(path: str | None):
    from tokenizers import Tokenizer

    if path is None:
        from r3mes.core.text_encoder import default_model_path

        path = str(default_model_path() / "tokenizer.json")
    tok = Tokenizer.from_file(path)
    # Counting must see the whole text; the model's own truncation would cap every count.
    tok.no_truncation()
    tok.no_padding()
    return tok


class Chunker:
    """Split documents into chunks of at most ``max_tokens`` word pieces with ``overlap``.

    ``tokenizer_path`` names a ``tokenizer.json``; the default is the shared MiniLM's.
    """

    def __init__(
        self,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        overlap: int = DEFAULT_OVERLAP,
        tokenizer_path: str | None = None,
    ) -> None:
        if max_tokens < 8:
            raise ValueError(f"max_tokens must be at least 8, got {max_tokens}")
        if not 0 <= overlap < max_tokens:
            raise ValueError(f"overlap must be in [0, max_tokens), got {overlap}")
        self.max_tokens = max_tokens
        self.overlap = overlap
        self._tok = _load_tokenizer(tokenizer_path)

    def count_tokens(self, text: str) -> int:
        """Number of word pieces in ``text`` (without [CLS]/[SEP])."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def chunk(self, doc: Document) -> list[Chunk]:
        """Chunks of one document, in order. Raises :class:`DocumentError` if it is empty."""
        if not doc.text or not doc.text.strip():
            raise DocumentError(f"document '{doc.doc_id}' is empty")
        sections = _markdown_sections(doc.text) if doc.metadata.get("format") == "markdown" \
            else [(0, len(doc.text), None)]
        chunks: list[Chunk] = []
        for start, end, title in sections:
            for c_start, c_end, n_tok in self._chunk_span(doc.text, start, end):
                meta = dict(doc.metadata)
                if title:
                    meta["section"] = title
                chunks.append(Chunk(doc.doc_id, len(chunks), doc.text[c_start:c_end].strip(),
                                    c_start, c_end, n_tok, meta))
        return [c for c in chunks if c.text] or _fail_empty(doc)

    def chunk_many(self, docs: Iterable[Document]) -> list[Chunk]:
        out: list[Chunk] = []
        for doc in docs:
            out.extend(self.chunk(doc))
        return out

    # -- internals -------------------------------------------------------------------------

    def _sentences(self, text: str, start: int, end: int) -> list[tuple[int, int, int]]:
        """(start, end, tokens) of each sentence in text[start:end]; long ones pre-split."""
        spans: list[tuple[int, int]] = []
        pos = start
        for m in _SENTENCE_END.finditer(text, start, end):
            if m.end() > pos and text[pos:m.end()].strip():
                spans.append((pos, m.end()))
            pos = m.end()
        if pos < end and text[pos:end].strip():
            spans.append((pos, end))
        if not spans:
            return []
        encs = self._tok.encode_batch([text[a:b] for a, b in spans], add_special_tokens=False)
        out: list[tuple[int, int, int]] = []
        for (a, b), enc in zip(spans, encs, strict=True):
            n = len(enc.ids)
            if n <= self.max_tokens:
                out.append((a, b, n))
                continue
            # A run-on "sentence" (a table, a code block, text without punctuation): cut it on
            # token offsets into windows that fit, stepping by max_tokens - overlap.
            offsets = enc.offsets
            step = self.max_tokens - self.overlap
            for i in range(0, n, step):
                j = min(i + self.max_tokens, n)
                s_char = a + offsets[i][0]
                e_char = a + offsets[j - 1][1] if j < n else b
                out.append((s_char, e_char, j - i))
                if j == n:
                    break
        return out

    def _chunk_span(self, text: str, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        sents = self._sentences(text, start, end)
        i = 0
        while i < len(sents):
            total = 0
            j = i
            while j < len(sents) and total + sents[j][2] <= self.max_tokens:
                total += sents[j][2]
                j += 1
            if j == i:  # cannot happen after pre-splitting, but never loop forever
                j = i + 1
                total = sents[i][2]
            yield sents[i][0], sents[j - 1][1], total
            if j >= len(sents):
                break
            # Start the next chunk with the trailing whole sentences that fit in ``overlap``,
            # but always advance by at least one sentence.
            back = j
            carried = 0
            while back - 1 > i and carried + sents[back - 1][2] <= self.overlap:
                back -= 1
                carried += sents[back][2]
            i = back


def _fail_empty(doc: Document) -> list[Chunk]:
    raise DocumentError(f"document '{doc.doc_id}' has no text to index")


def _markdown_sections(text: str) -> list[tuple[int, int, str | None]]:
    """(start, end, heading) spans; each heading starts a new section."""
    marks = [(m.start(), m.group(2)) for m in _HEADING.finditer(text)]
    if not marks or marks[0][0] > 0:
        marks.insert(0, (0, None))
    sections = []
    for k, (pos, title) in enumerate(marks):
        stop = marks[k + 1][0] if k + 1 < len(marks) else len(text)
        if text[pos:stop].strip():
            sections.append((pos, stop, title))
    return sections


# -- loaders ------------------------------------------------------------------------------


def _read_text_file(path: Path, max_bytes: int) -> str:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read ({exc.strerror})") from exc
    if size > max_bytes:
        raise DocumentError(
            f"{path}: file is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit "
            "for one document (split it, or raise max_file_bytes)"
        )
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise DocumentError(f"{path}: looks like a binary file (NUL bytes); only text is indexed")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"{path}: not valid UTF-8 at byte {exc.start}; only UTF-8 text is indexed"
        ) from exc
    if not text.strip():
        raise DocumentError(f"{path}: file is empty")
    return text


def load_documents(
    path: str | Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> list[Document]:
    """Documents from a ``.txt``, ``.md`` or ``.jsonl`` file (chosen by suffix).

    Plain and Markdown files give one document whose id is the file name; JSONL gives one per
    line, id from ``id``/``doc_id`` (else ``<file>:<line>``), every other field but ``text``
    kept as metadata. Raises :class:`DocumentError` naming the file (and line).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DocumentError(f"{path}: is a directory; pass files")
    if not path.exists():
        raise DocumentError(f"{path}: no such file")
    text = _read_text_file(path, max_file_bytes)
    if suffix in JSONL_SUFFIXES:
        return list(_parse_jsonl(path, text))
    meta: dict[str, Any] = {"source": str(path)}
    if suffix in MARKDOWN_SUFFIXES:
        meta["format"] = "markdown"
        first = _HEADING.search(text)
        if first:
            meta["title"] = first.group(2)
    elif suffix not in TEXT_SUFFIXES:
        raise DocumentError(
            f"{path}: unsupported file type '{suffix}' (supported: .txt, .md, .jsonl)"
        )
    return [Document(path.name, text, meta)]


def _parse_jsonl(path: Path, text: str) -> Iterator[Document]:
    seen: set[str] = set()
    found = False
    for lineno, obj in jsonl_records(path, text.splitlines(), DocumentError):
        if not isinstance(obj, dict):
            raise DocumentError(f"{path}:{lineno}: expected a JSON object, got "
                                f"{type(obj).__name__}")
        body = obj.get("text")
        if not isinstance(body, str):
            raise DocumentError(f"{path}:{lineno}: missing string field 'text'")
        if not body.strip():
            raise DocumentError(f"{path}:{lineno}: field 'text' is empty")
        doc_id = obj.get("id", obj.get("doc_id"))
        doc_id = f"{path.name}:{lineno}" if doc_id is None else str(doc_id)
        if doc_id in seen:
            raise DocumentError(f"{path}:{lineno}: duplicate document id '{doc_id}'")
        seen.add(doc_id)
        meta = {k: v for k, v in obj.items() if k not in ("text", "id", "doc_id")}
        meta.setdefault("source", str(path))
        found = True
        yield Document(doc_id, body, meta)
    if not found:
        raise DocumentError(f"{path}: no documents (every line is blank)")
