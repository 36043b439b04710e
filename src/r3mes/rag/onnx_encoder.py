"""The retrieval sentence model on ONNX Runtime with int8 dynamic quantisation.

sentence-transformers' own ONNX backend needs ``optimum``, whose releases pin
``transformers < 5`` (r3mes runs on 5.x), so the same recipe is done here with the
established pieces directly: the bundled MiniLM (or any local BERT-style
sentence-transformers directory with mean pooling) is exported once with ``torch.onnx``,
quantised with ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, per channel),
and run with ONNX Runtime; tokenisation is the model's own ``tokenizer.json`` through
``tokenizers``, pooling the mean over real tokens as in the model's pooling config.

Measured on the judged retrieval set (``benchmarks/bench_rag_embed.py``): about twice the
throughput of PyTorch fp32 on two cores, vectors within cosine 0.97 of fp32 (0.99 on
average), recall@5 unchanged; see BENCHMARKS.md. Loading needs no torch at all once the
file exists, which also makes a cold ``r3mes index search`` start faster.

The exported files live under the embedding cache (``<home>/rag/embedding-cache/<model
fingerprint>/onnx/``), are written to a temporary directory and renamed into place, and are
checked against a sha256 recorded next to them; a bad file is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ONNX_FORMAT = 1
MODEL_FILE = "model-int8.onnx"
META_FILE = "model-int8.json"
_export_lock = threading.Lock()
# fingerprint -> a directory holding a verified export made in this process: another cache
# directory for the same model copies it instead of exporting again
_exported: dict[str, Path] = {}


def onnx_available() -> bool:
    """Whether ONNX Runtime and the ONNX quantiser are installed here (``onnx`` is found,
    not imported: it takes a second to import and only the one-time export needs it)."""
    import importlib.util

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec("onnx") is not None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _max_length(model_dir: Path) -> int:
    try:
        config = json.loads((model_dir / "sentence_bert_config.json").read_text("utf-8"))
        return int(config.get("max_seq_length") or 256)
    except (OSError, ValueError):
        return 256


def export_int8(model_dir: Path, out_dir: Path, fingerprint: str) -> Path:
    """Export ``model_dir``'s transformer to ONNX, quantise it to int8 and write
    ``out_dir/model-int8.onnx`` with its metadata; returns the model path. Needs torch."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".onnx-", dir=out_dir))
    try:
        bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

        class LastHidden(torch.nn.Module):
            """Keyword arguments in, last hidden state out (the exporter passes positionals,
            and BertModel's positional order changed across transformers releases)."""

            def __init__(self, model: Any) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        sample = tokenizer(["an example", "a slightly longer example sentence"],
                           padding=True, return_tensors="pt")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        fp32 = work / "model.onnx"
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                LastHidden(bert), tuple(sample[n] for n in names), str(fp32),
                input_names=names, output_names=["last_hidden_state"],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names,
                                                                      "last_hidden_state"]},
                opset_version=17, dynamo=False)
        quantized = work / MODEL_FILE
        quantize_dynamic(str(fp32), str(quantized), weight_type=QuantType.QInt8,
                         per_channel=True)
        meta = {"format": ONNX_FORMAT, "fingerprint": fingerprint,
                "sha256": _sha256(quantized), "max_length": _max_length(model_dir)}
        os.replace(quantized, out_dir / MODEL_FILE)
        (work / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        os.replace(work / META_FILE, out_dir / META_FILE)  # the commit marker, written last
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir / MODEL_FILE


def default_threads() -> int:
    """Threads for the encoder's session: ``$OMP_NUM_THREADS`` when set (Ray sets it to a
    worker's CPUs), else the CPUs this process may run on (its affinity: a container's or
    ``taskset``'s share, not the whole machine)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _copy_export(source: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, META_FILE):  # the metadata, the commit marker, last
        tmp = out_dir / f".{name}.tmp"
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, out_dir / name)


def _valid(out_dir: Path, fingerprint: str) -> bool:
    try:
        meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
        return (meta.get("format") == ONNX_FORMAT and meta.get("fingerprint") == fingerprint
                and meta.get("sha256") == _sha256(out_dir / MODEL_FILE))
    except (OSError, ValueError, AttributeError):
        return False


class OnnxInt8Encoder:
    """Mean-pooled, L2-normalised sentence vectors from the int8 ONNX export of a model.

    ``out_dir`` holds the export (made on first use); ``threads`` ONNX Runtime intra-op
    threads (default: all cores).
    """

    def __init__(self, model_dir: Path, out_dir: Path, fingerprint: str,
                 threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        with _export_lock:
            if not _valid(out_dir, fingerprint):
                known = _exported.get(fingerprint)
                if known is not None and known != out_dir and _valid(known, fingerprint):
                    _copy_export(known, out_dir)
                else:
                    log.info("exporting %s to int8 ONNX in %s (once)", model_dir, out_dir)
                    export_int8(model_dir, out_dir, fingerprint)
            _exported[fingerprint] = out_dir
        meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
        self.max_length = int(meta["max_length"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or default_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(out_dir / MODEL_FILE), options,
                                            providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit rows; one padded batch (sort by length first)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        types = np.zeros((len(texts), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = enc.attention_mask
            types[row, :n] = enc.type_ids
        with self._lock:
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                             "token_type_ids": types})[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return np.ascontiguousarray(pooled / np.maximum(norms, 1e-12), dtype=np.float32)
