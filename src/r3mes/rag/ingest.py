"""Turning what users hand in (files, directories, PDFs, web pages, Word files) into documents.

``r3mes index add PATH...`` takes files and directories. A directory is walked recursively
(``--glob`` picks the files, e.g. ``"*.pdf"`` or ``"**/notes/*.md"``); hidden files and
directories are left out. Each file is read by its suffix:

- ``.txt``, ``.md``, ``.jsonl`` (and their variants): :func:`r3mes.rag.chunker.load_documents`
- ``.pdf``: ``pypdf``, page by page; the text of all pages, pages separated by a blank line
  (a scanned PDF without a text layer has no text and is reported as skipped)
- ``.html``, ``.htm``: BeautifulSoup with the standard library's parser; scripts, styles,
  navigation, headers and footers dropped, the ``<title>`` kept as the title
- ``.docx``: ``python-docx``; paragraphs and table cells in document order

Anything else, and any file found in a directory that fails to read, is *skipped*: listed
with the reason, never fatal, so one odd file in a folder of a thousand does not stop the
other 999. A file of a supported type that the user named explicitly and that cannot be
read (a malformed JSONL, a binary ``.txt``) is an error instead, and nothing is indexed:
that file was asked for, so silently leaving it out would hide the problem.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r3mes.rag.chunker import (
    DEFAULT_MAX_FILE_BYTES,
    JSONL_SUFFIXES,
    MARKDOWN_SUFFIXES,
    TEXT_SUFFIXES,
    Document,
    load_documents,
)
from r3mes.rag.errors import DocumentError

PDF_SUFFIXES = {".pdf"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
DOCX_SUFFIXES = {".docx"}
PLAIN_SUFFIXES = (TEXT_SUFFIXES - {""}) | MARKDOWN_SUFFIXES | JSONL_SUFFIXES
SUPPORTED_SUFFIXES = frozenset(PLAIN_SUFFIXES | PDF_SUFFIXES | HTML_SUFFIXES | DOCX_SUFFIXES)
_BLANK_RUNS = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t\u00a0]+")


@dataclass
class IngestResult:
    """What a walk over the inputs found: the documents, the files they came from, and the
    files skipped with the reason for each."""

    documents: list[Document] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _hidden(path: Path, root: Path) -> bool:
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = path.parts
    return any(p.startswith(".") for p in parts)


def collect_files(
    paths: Iterable[str | Path], glob: str | None = None
) -> tuple[list[Path], list[dict[str, str]], set[Path]]:
    """Expand ``paths`` into the files to read, the ones skipped (with why), and which of the
    files were named explicitly (not found in a directory).

    A file named directly is always taken (so an unsupported one is reported, not ignored);
    a directory gives its files recursively, in sorted order, matching ``glob`` (against the
    path relative to the directory and against the bare file name) when one is given, and of
    a supported type otherwise. A missing path is skipped with "no such file or directory".
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    explicit: set[Path] = set()
    seen: set[Path] = set()

    def take(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            take(path)
            explicit.add(path)
        elif path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if _hidden(child, path):
                    continue
                relative = child.relative_to(path).as_posix()
                if glob is not None:
                    if fnmatch.fnmatch(relative, glob) or fnmatch.fnmatch(child.name, glob):
                        take(child)
                elif child.suffix.lower() in SUPPORTED_SUFFIXES:
                    take(child)
                else:
                    skipped.append({"path": str(child),
                                    "reason": f"unsupported file type '{child.suffix}'"})
        else:
            skipped.append({"path": str(path), "reason": "no such file or directory"})
    return files, skipped, explicit


def _tidy(text: str) -> str:
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def read_pdf(path: Path) -> tuple[str, dict[str, Any]]:
    """Text and metadata (title, pages) of a PDF's text layer."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or None
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DocumentError(f"{path}: not a readable PDF ({exc})") from None
    meta: dict[str, Any] = {"format": "pdf", "pages": len(pages)}
    if title:
        meta["title"] = str(title)
    return "\n\n".join(_tidy(p) for p in pages if p.strip()), meta


_HTML_DROP = ("script", "style", "noscript", "template", "nav", "header", "footer", "aside",
              "form", "svg")
_HTML_BLOCKS = ("p", "div", "section", "article", "main", "li", "tr", "br", "h1", "h2", "h3",
                "h4", "h5", "h6", "pre", "blockquote", "table", "ul", "ol", "dd", "dt")


def read_html(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[str, dict[str, Any]]:
    """Visible text and title of an HTML page (boilerplate elements dropped)."""
    from bs4 import BeautifulSoup

    data = _read_bytes(path, max_bytes)
    soup = BeautifulSoup(data, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(_HTML_DROP):
        tag.decompose()
    # Block elements end a line, so paragraphs stay paragraphs for the chunker.
    for tag in soup.find_all(_HTML_BLOCKS):
        tag.insert_after("\n")
    body = soup.body or soup
    meta: dict[str, Any] = {"format": "html"}
    if title:
        meta["title"] = title
    return _tidy(body.get_text()), meta


def read_docx(path: Path) -> tuple[str, dict[str, Any]]:
    """Paragraph and table text of a Word ``.docx`` file, in document order."""
    import zipfile

    from docx import Document as DocxDocument
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        doc = DocxDocument(str(path))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise DocumentError(f"{path}: not a readable .docx file ({exc})") from None
    parts: list[str] = []
    for block in doc.element.body.iterchildren():
        tag = block.tag.rsplit("}", 1)[-1]
        if tag == "p":
            parts.append(Paragraph(block, doc).text)
        elif tag == "tbl":
            for row in Table(block, doc).rows:
                parts.append(" | ".join(cell.text.strip() for cell in row.cells))
    meta: dict[str, Any] = {"format": "docx"}
    title = doc.core_properties.title
    if title:
        meta["title"] = title
    return _tidy("\n".join(parts)), meta


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise DocumentError(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
    return path.read_bytes()


_READERS: dict[str, Callable[[Path], tuple[str, dict[str, Any]]]] = {
    **{s: read_pdf for s in PDF_SUFFIXES},
    **{s: read_html for s in HTML_SUFFIXES},
    **{s: read_docx for s in DOCX_SUFFIXES},
}


def read_file(path: str | Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[Document]:
    """The documents in one file, by suffix (see the module docstring); a rich format gives
    one document whose id is the file name. Raises :class:`DocumentError` naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        if suffix not in PLAIN_SUFFIXES and suffix != "":
            raise DocumentError(
                f"{path}: unsupported file type '{suffix}' "
                f"(supported: {', '.join(sorted(SUPPORTED_SUFFIXES))})")
        return load_documents(path, max_file_bytes)
    if path.stat().st_size > max_file_bytes:
        raise DocumentError(f"{path}: over the {max_file_bytes}-byte limit")
    text, meta = reader(path)
    if not text.strip():
        raise DocumentError(f"{path}: no text found (a scanned PDF needs OCR first)"
                            if suffix in PDF_SUFFIXES else f"{path}: no text found")
    meta["source"] = str(path)
    return [Document(path.name, text, meta)]


def ingest(
    paths: Iterable[str | Path],
    glob: str | None = None,
    *,
    progress: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> IngestResult:
    """Read every file under ``paths`` (see :func:`collect_files`); files that cannot be read
    go to ``skipped`` with the reason, except a supported file named explicitly, whose
    :class:`DocumentError` is raised. ``progress`` shows a bar on stderr (tqdm)."""
    files, skipped, explicit = collect_files(paths, glob)
    result = IngestResult(skipped=skipped)
    for path in _progress(files, progress, "reading"):
        try:
            docs = read_file(path, max_file_bytes)
        except DocumentError as exc:
            if path in explicit and path.suffix.lower() in SUPPORTED_SUFFIXES | {""}:
                raise
            result.skipped.append({"path": str(path), "reason": _reason(exc, path)})
            continue
        except (OSError, UnicodeDecodeError) as exc:
            result.skipped.append({"path": str(path), "reason": f"cannot read: {exc}"})
            continue
        result.documents.extend(docs)
        result.files.append(str(path))
    return result


def _reason(exc: Exception, path: Path) -> str:
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _progress(items: list[Path], enabled: bool, what: str) -> Iterator[Path]:
    if not enabled or len(items) < 2:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=what, unit="file", leave=False)
