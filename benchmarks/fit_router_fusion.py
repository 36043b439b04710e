"""Fit the router's calibrated fusion on the train split; report train and held-out test.

    python benchmarks/fit_router_fusion.py                       # default encoder (e5)
    python benchmarks/fit_router_fusion.py --model all-MiniLM-L6-v2
    python benchmarks/fit_router_fusion.py --report-only         # score the shipped files

Steps: (1) rebuild the packaged expert embeddings for the encoder when the registry
changed; (2) compute the keyword + semantic evidence of every *train* question whose gold
expert is topical, from ``tests/data/router_realstyle.yaml`` and the train split of
``tests/data/router_eval.yaml``; (3) fit the conditional logit on them
(:func:`r3mes.router.calibration.fit_fusion`) and the general-fallback threshold on
out-of-fold probabilities (5 folds, so the threshold is not fitted on in-sample
confidence); (4) write ``src/r3mes/router/data/fusion-<encoder>.json``; (5) report
domain top-1 / top-3 and language top-3 of the whole router on both splits. The test split
is never read before step 5.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from r3mes.router.calibration import (
    fit_fusion,
    fit_general_threshold,
    save_fusion,
)
from r3mes.router.evaluation import LabelledQuestion, load_labelled, score_router
from r3mes.router.hybrid_router import HybridRouter
from r3mes.router.registry import load_registry
from r3mes.router.semantic_router import (
    PACKAGED_DIR,
    build_embeddings,
    read_embeddings,
    save_embeddings,
)

ROOT = Path(__file__).resolve().parent.parent
REALSTYLE = ROOT / "tests" / "data" / "router_realstyle.yaml"
SEED_EVAL = ROOT / "tests" / "data" / "router_eval.yaml"


def seed_train_questions(topical: set[str]) -> list[LabelledQuestion]:
    """The train split of the seed's evaluation set, topical gold experts only."""
    data = yaml.safe_load(SEED_EVAL.read_text(encoding="utf-8"))
    return [
        LabelledQuestion(q, expert, "?", (), "train")
        for expert, splits in data["by_expert"].items() if expert in topical
        for q in splits["train"]
    ]


def evidence(router: HybridRouter, text: str) -> np.ndarray:
    """``(n_topical, 5)``: keyword stems then the semantic features, topical experts."""
    stems, _ = router.keyword.evidence(text)
    features = router.semantic.features(text)
    topical = ~router._language
    return np.column_stack([np.asarray(stems)[topical], features[topical]])


def out_of_fold_probabilities(
    x: np.ndarray, y: np.ndarray, ids: list[str], encoder: str, folds: int = 5
) -> np.ndarray:
    rng = np.random.default_rng(0)
    fold_of = rng.permutation(len(y)) % folds
    out = np.zeros((len(y), len(ids)))
    for k in range(folds):
        held = fold_of == k
        model = fit_fusion(x[~held], y[~held], ids, encoder=encoder)
        out[held] = [model.probabilities(row, ids) for row in x[held]]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="encoder (default: multilingual e5)")
    parser.add_argument("--report-only", action="store_true", help="fit nothing, only score")
    parser.add_argument("--misses", action="store_true", help="print train misses")
    args = parser.parse_args()

    registry = load_registry()
    if not args.report_only and read_embeddings(PACKAGED_DIR, registry, args.model)[0] is None:
        print("rebuilding packaged expert embeddings ...", file=sys.stderr)
        save_embeddings(build_embeddings(registry, args.model), PACKAGED_DIR)

    router = HybridRouter(model_name=args.model).warm_up()
    encoder = router.semantic.encoder_slug
    if not args.report_only:
        ids = router._topical_ids
        train = [q for q in load_labelled(REALSTYLE, ["train"]) if q.gold in ids]
        train += seed_train_questions(set(ids))
        x = np.stack([evidence(router, q.text) for q in train])
        y = np.array([ids.index(q.gold) for q in train])
        model = fit_fusion(x, y, ids, encoder=encoder)
        oof = out_of_fold_probabilities(x, y, ids, encoder)
        threshold = fit_general_threshold(oof, y, ids.index(registry.fallback.id))
        model = type(model)(**{**model.__dict__, "general_threshold": threshold,
                               "fitted_on": {"questions": len(train),
                                             "registry_sha256": registry.digest,
                                             "sources": ["router_realstyle.yaml:train",
                                                         "router_eval.yaml:train"]}})
        path = save_fusion(model, PACKAGED_DIR)
        print(f"wrote {path.relative_to(ROOT)} (n={len(train)}, "
              f"general_threshold={threshold})", file=sys.stderr)
        router = HybridRouter(model_name=args.model).warm_up()

    report = {}
    for split in ("train", "test"):
        score = score_router(router, load_labelled(REALSTYLE, [split]))
        report[split] = score.to_dict()
        if args.misses and split == "train":
            for miss in score.misses:
                print(miss, file=sys.stderr)
    print(json.dumps({"encoder": encoder, **report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
