"""Ingest as users feed it: directories, globs, PDF / HTML / DOCX, skipped files, user index
names, through the library and through ``r3mes index add``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r3mes.cli import main
from r3mes.rag.errors import DocumentError
from r3mes.rag.ingest import collect_files, ingest, read_file


def write_pdf(path: Path, lines: list[str]) -> None:
    """A minimal one-page PDF with a real text layer (Helvetica), xref offsets exact."""
    text = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(
        f"({line.replace('(', '[').replace(')', ']')}) '" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        "/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        f"<< /Length {len(text)} >>\nstream\n{text}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
            .encode())
    path.write_bytes(bytes(out))


def write_docx(path: Path) -> None:
    import docx

    document = docx.Document()
    document.core_properties.title = "Quarterly plan"
    document.add_paragraph("The lighthouse keeper logs the tide every evening.")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "harbour"
    table.rows[0].cells[1].text = "closed on Sundays"
    document.save(str(path))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "notes" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "readme.txt").write_text("Plain notes about sourdough starters.", encoding="utf-8")
    (root / "notes" / "guide.md").write_text("# Kayaks\nHow to roll a kayak.", encoding="utf-8")
    (root / "notes" / "deep" / "page.html").write_text(
        "<html><head><title>Glacier walks</title><script>var x = 1;</script></head>"
        "<body><nav>Home | About</nav><p>Crampons grip the blue ice.</p>"
        "<footer>(c) nobody</footer></body></html>", encoding="utf-8")
    write_pdf(root / "notes" / "report.pdf", ["Falcons nest on the cathedral tower.",
                                              "Second line of the report."])
    write_docx(root / "plan.docx")
    (root / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    (root / ".git" / "config").write_text("[core]", encoding="utf-8")
    return root


def test_a_directory_is_walked_recursively_hidden_entries_left_out(corpus: Path) -> None:
    files, skipped, explicit = collect_files([corpus])
    names = sorted(p.name for p in files)
    assert names == ["broken.pdf", "guide.md", "page.html", "plan.docx", "readme.txt",
                     "report.pdf"]
    assert [s["path"] for s in skipped] == [str(corpus / "photo.png")]
    assert not explicit


def test_glob_picks_files_by_pattern(corpus: Path) -> None:
    files, _, _ = collect_files([corpus], glob="*.md")
    assert [p.name for p in files] == ["guide.md"]
    files, _, _ = collect_files([corpus], glob="notes/deep/*")
    assert [p.name for p in files] == ["page.html"]


def test_pdf_html_and_docx_are_read_with_their_text_and_titles(corpus: Path) -> None:
    [pdf] = read_file(corpus / "notes" / "report.pdf")
    assert "Falcons nest on the cathedral tower." in pdf.text
    assert pdf.metadata["format"] == "pdf" and pdf.metadata["pages"] == 1
    [html] = read_file(corpus / "notes" / "deep" / "page.html")
    assert html.text == "Crampons grip the blue ice."
    assert html.metadata["title"] == "Glacier walks"
    [word] = read_file(corpus / "plan.docx")
    assert "lighthouse keeper" in word.text and "harbour | closed on Sundays" in word.text
    assert word.metadata["title"] == "Quarterly plan"
    assert word.metadata["source"] == str(corpus / "plan.docx")


def test_unreadable_and_unsupported_files_are_skipped_with_a_reason(corpus: Path) -> None:
    result = ingest([corpus])
    assert len(result.documents) == 5
    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert set(reasons) == {"photo.png", "broken.pdf"}
    assert "unsupported file type '.png'" in reasons["photo.png"]
    assert "not a readable PDF" in reasons["broken.pdf"]


def test_a_broken_file_named_explicitly_is_an_error(corpus: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DocumentError, match="bad.jsonl:2"):
        ingest([corpus / "readme.txt", bad])
    # An unsupported type named explicitly is listed, not fatal.
    result = ingest([corpus / "readme.txt", corpus / "photo.png", tmp_path / "missing.txt"])
    assert len(result.documents) == 1
    assert {Path(s["path"]).name for s in result.skipped} == {"photo.png", "missing.txt"}


def test_cli_indexes_a_directory_into_a_user_named_index(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "home")
    assert main(["index", "add", str(corpus), "--index", "field-notes_2024",
                 "--home", home, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["index"] == "field-notes_2024" and out["documents"] == 5
    assert {Path(s["path"]).name for s in out["skipped"]} == {"photo.png", "broken.pdf"}
    assert len(out["files"]) == 5
    assert main(["index", "search", "falcons cathedral tower", "--index", "field-notes_2024",
                 "--mode", "sparse", "--home", home, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert hits[0]["doc_id"] == "report.pdf"
    assert main(["index", "list", "--home", home, "--json"]) == 0
    names = [row["name"] for row in json.loads(capsys.readouterr().out)["indices"]]
    assert names == ["field-notes_2024"]


def test_cli_with_nothing_readable_fails_and_says_why(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "home")
    assert main(["index", "add", str(corpus), "--glob", "*.png", "--home", home]) == 2
    err = capsys.readouterr().err
    assert "no documents to index" in err and "photo.png" in err
