"""A small judged query set over /work/shared/data texts, written for these tests.

Corpus: the LibreOffice Calc and Writer *guide* pages of the Turkish help (the judged pages
and the short ones as distractors) and the
first three chapters of Pride and Prejudice. Turkish queries are phrased as a user would ask,
not copied from titles; a hit is relevant when it comes from one of the listed pages.
English queries paraphrase a passage; a hit is relevant when its text contains the passage's
key phrase.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from r3mes.rag import Document

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
if not DATA.is_dir():  # the repository may be checked out elsewhere; the data folder is fixed
    DATA = Path("/work/shared/data")
HELP = DATA / "turkish-software-help" / "help_tr.jsonl"
NOVEL = DATA / "english-novels" / "pride_prejudice.txt"

_G = "text/scalc/guide/"
_W = "text/swriter/guide/"

# (query, relevant doc ids)
TURKISH: list[tuple[str, set[str]]] = [
    ("Calc'de iki tarih arasındaki gün farkını nasıl hesaplarım?",
     {_G + "calc_date.html", _G + "calc_timevalues.html"}),
    ("yalnızca görünen hücreleri kopyalamak istiyorum", {_G + "cellcopy.html"}),
    ("eksi değerli sayıları kırmızı renkte göstermek", {_G + "cellstyle_minusvalue.html"}),
    ("CSV metin dosyasını içe aktarma", {_G + "csv_formula.html"}),
    ("özet tablo nasıl silinir", {_G + "datapilot_deletetable.html"}),
    ("başında sıfır olan numara girince sıfır kayboluyor", {_G + "integer_leading_zero.html"}),
    ("kaydırırken ilk satır ekranda sabit kalsın", {_G + "line_fix.html"}),
    ("hücreye açıklama notu eklemek", {_G + "note_insert.html"}),
    ("sayfayı yatay yönde yazdırmak", {_G + "print_landscape.html"}),
    ("Calc'de başlık satırı her sayfada tekrar yazdırılsın", {_G + "print_title_row.html"}),
    ("farklı senaryolar oluşturup karşılaştırmak", {_G + "scenario.html"}),
    ("satırlarla sütunların yerini değiştirmek", {_G + "table_rotate.html"}),
    ("hücreye yalnızca belirli değerlerin girilmesine izin vermek",
     {_G + "validity.html"}),
    ("istenen sonucu verecek girdi değerini bulmak için hedef arama",
     {_G + "goalseek.html"}),
    ("yazarken otomatik yazım denetimini kapatmak", {_W + "auto_spellcheck.html"}),
    ("alt bilgiye sayfa numarası eklemek", {_W + "footer_pagenumber.html"}),
    ("belgeye kaynakça eklemek", {_W + "indices_literature.html"}),
    ("alfabetik dizin oluşturmak", {_W + "indices_index.html"}),
    ("tarayıcıdan resim taramak ve belgeye koymak", {_W + "insert_graphic_scan.html"}),
    ("satır numaralarını kenarda göstermek", {_W + "numbering_lines.html"}),
    ("yazdırırken hangi kağıt tepsisi kullanılacağını seçmek", {_W + "printer_tray.html"}),
    ("tablodaki hücreleri birleştirmek veya bölmek", {_W + "table_cellmerge.html"}),
    ("belgedeki kelime sayısını öğrenmek", {_W + "words_count.html"}),
    ("bir kelimenin eş anlamlısını bulmak", {_W + "using_thesaurus.html"}),
    ("metni büyük harfe çevirmek", {_W + "text_capital.html"}),
    ("metnin bir kısmını gizlemek", {_W + "hidden_text.html", _W + "hidden_text_display.html"}),
    ("kelime tamamlama önerilerini ayarlamak",
     {_W + "word_completion_adjust.html", _W + "word_completion.html"}),
    ("sayfanın arka plan rengini değiştirmek",
     {_W + "pagebackground.html", _W + "background.html"}),
]

# (query, key phrase of the relevant passage)
ENGLISH: list[tuple[str, str]] = [
    ("a rich unmarried man is assumed to need a wife", "truth universally acknowledged"),
    ("Darcy says Elizabeth is not pretty enough for him to dance with",
     "tolerable, but not handsome enough"),
    ("Mr Bennet teases his wife that her nerves are old acquaintances of his",
     "They are my old friends"),
    ("the youngest daughter boasts about her height", "I'm the tallest"),
    ("rumour about how many ladies and gentlemen Bingley would bring to the ball",
     "twelve ladies and seven gentlemen"),
    ("how large is Darcy's yearly income", "ten thousand a year"),
    ("Mrs Bennet scolds Kitty for coughing", "keep coughing so, Kitty"),
    ("the girls saw from the window what colour coat the visitor wore", "wore a blue coat"),
]

QUERIES = len(TURKISH) + len(ENGLISH)
JUDGED_DOCS = set().union(*(rel for _, rel in TURKISH))


def available() -> bool:
    return HELP.is_file() and NOVEL.is_file()


def build_corpus() -> list[Document]:
    docs = []
    with open(HELP, encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            # every judged page, plus short guide pages as distractors (keeps indexing fast)
            if d["id"] in JUDGED_DOCS or (d["id"].startswith((_G, _W))
                                          and 300 <= len(d["text"]) <= 600):
                docs.append(Document(d["id"], d["text"], {"title": d["title"], "lang": "tr"}))
    text = NOVEL.read_text(encoding="utf-8")
    end = text.index("Chapter 4")
    docs.append(Document("pride_prejudice.txt", text[:end], {"title": "Pride and Prejudice",
                                                            "lang": "en"}))
    return docs


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s)


def relevant(hit, judgement) -> bool:
    if isinstance(judgement, set):
        return hit.doc_id in judgement
    return _norm(judgement) in _norm(hit.text)


def evaluate(retriever, mode: str, k: int = 5) -> dict[str, float]:
    """recall@k (a relevant hit in the top k) and MRR@k over all queries."""
    found = 0
    rr = 0.0
    judged = [(q, rel) for q, rel in TURKISH] + [(q, rel) for q, rel in ENGLISH]
    for query, rel in judged:
        hits = retriever.search(query, top_k=k, mode=mode)
        for rank, hit in enumerate(hits, start=1):
            if relevant(hit, rel):
                found += 1
                rr += 1.0 / rank
                break
    return {"recall": found / len(judged), "mrr": rr / len(judged)}
