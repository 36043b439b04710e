"""Loading BitNet checkpoints (HF directories and the r3mes packed format) and converting.

:func:`load_model` takes a local directory and returns a :class:`BitNetForCausalLM`:

* an **HF directory** (``config.json``, ``model.safetensors`` or sharded
  ``model-*.safetensors`` + ``model.safetensors.index.json``). Architectures:
  ``BitNetForCausalLM`` (model_type ``bitnet``) and Llama-shaped ternary checkpoints
  (model_type ``llama`` with a ``quantization_config`` of ``quant_method: bitnet``, as the
  Falcon3-*-1.58bit models). Projection weights come in either form:

  - *packed offline* (transformers' BitNet integration): uint8 ``[out/4, in]``, where bits
    ``2i..2i+1`` of byte ``[r, c]`` hold the code ``w + 1`` of weight row ``i*out/4 + r``,
    plus ``weight_scale``. With ``linear_class: bitlinear`` HF computes
    ``y = (q . T^T) / (s_x * weight_scale)``, so ``weight_scale`` *is* our s_w (the
    inverse of the dequantisation multiplier); with ``linear_class: autobitlinear`` it
    multiplies, ``y = ... * weight_scale``, so s_w = 1 / weight_scale.
  - *float* (bf16/fp16/fp32, no quantization_config or ``quantization_mode: online``):
    quantised at load with absmean, one tensor at a time from the memory map.

* an **r3mes packed directory** (written by :func:`convert`), which loads without any
  conversion: every tensor is used in place from a memory map.

FORMAT (r3mes packed, version 1)
--------------------------------
A directory holding::

    r3mes_model.json          manifest (written last, atomically)
    model.r3mes.safetensors   all tensors (a standard safetensors file)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    generation_config.json, chat_template.jinja      copied when present in the source

``r3mes_model.json``::

    {"format": "r3mes-bitnet", "format_version": 2,
     "config": {BitNetConfig fields},
     "weight_layout": "r3mes-2bit-g256",
     "head": "int8-rowwise" | "int4-g64" | "float32",
     "weights_file": "model.r3mes.safetensors",
     "weights_sha256": "<sha256 of the whole weights file>",
     "weights_bytes": <size>,
     "source": "<source directory name>"}

Tensors in ``model.r3mes.safetensors`` (``L`` = a projection path such as
``model.layers.0.self_attn.q_proj``):

* ``L.packed``  uint8 [out, packed_row_bytes(in)]: ternary codes in the kernels' layout
  ``r3mes-2bit-g256`` (``csrc/ternary/ternary.h``): rows padded to 256 weights, 2 bits a
  weight, code = w + 1.
* ``L.weight_scale``  float32 [1]: s_w (``y = acc / (s_x * s_w)``).
* ``model.layers.N.{input_layernorm,post_attention_layernorm}.weight``,
  ``...self_attn.attn_sub_norm.weight``, ``...mlp.ffn_sub_norm.weight``,
  ``model.norm.weight``: float32.
* ``model.embed_tokens.weight``: [V, H] in the source dtype (bf16/fp16/fp32); only the
  rows looked up are ever read, so it costs disk, not memory.
* head ``int8-rowwise``: ``lm_head.qweight`` int8 [V, H padded to a multiple of 64],
  ``lm_head.weight_scale`` float32 [V] and ``lm_head.row_sums`` int32 [V]: per-row absmax
  int8 (``W ~= qweight / weight_scale``, ``weight_scale = 127 / max|W_row|``), the form the
  native int8 kernel reads (:class:`r3mes.kernels.Int8Weight`). Head ``int4-g64``:
  ``lm_head.packed`` uint8 [V, Hp / 2] (Hp: H padded to 128), ``lm_head.group_scales``
  uint8 [V, Hp / 64], ``lm_head.weight_scale`` float32 [V] and ``lm_head.offsets`` int32
  [V]: group-wise int4 with integer group scales, the 4-bit kernel's form
  (:class:`r3mes.kernels.Int4Weight`, ``csrc/head/int4_gemm.h``). Head ``float32``:
  ``lm_head.weight`` float32 [V, H].

Version history: 1 held the int8 head as four base-4 planes on the ternary kernel; 2
stores it for the dedicated int8 kernel. A version-1 directory is refused with a message
to run ``r3mes convert`` again.

Tensors are stored widest dtype first and the data starts 64-byte aligned, so every tensor
is naturally aligned in the memory map. The safetensors ``__metadata__`` repeats
``format`` and ``format_version``. A reader refuses an unknown format or a newer version,
a weights file whose size differs from the manifest, and (with ``verify=True``, or
``r3mes generate --verify``) one whose sha256 differs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r3mes import kernels
from r3mes.core.model import (
    LINEAR_NAMES,
    BitNetConfig,
    BitNetForCausalLM,
    LMHead,
    bitlinear_from_packed,
    linear_shapes,
)
from r3mes.errors import R3mesError
from r3mes.utils.atomic import atomic_open, atomic_write_json
from r3mes.utils.hashing import file_sha256
from r3mes.utils.safetensors_io import SafetensorsFile, write_safetensors

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "LoadInfo",
    "ModelShape",
    "SafetensorsFile",
    "convert",
    "describe_model",
    "load_model",
    "read_config",
    "read_model_shape",
    "verify_weights",
]

FORMAT_NAME = "r3mes-bitnet"
FORMAT_VERSION = 2
MANIFEST = "r3mes_model.json"
WEIGHTS_FILE = "model.r3mes.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "tokenizer.model")
HEAD_KINDS = {"int8": "int8-rowwise", "int4": "int4-g64", "float": "float32"}
INT4_HEAD_GROUP = 64


class CheckpointError(R3mesError, ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


# --------------------------------------------------------------------------- safetensors
def _open_safetensors(path: Path) -> SafetensorsFile:
    """A checkpoint's weights file, validated and mapped; errors are CheckpointErrors."""
    return SafetensorsFile(path, CheckpointError)


def _take_weight(sf: SafetensorsFile, name: str) -> torch.Tensor:
    """A 2-D 8-bit weight copied into weight memory (:func:`r3mes.kernels.weight_empty`:
    2 MiB pages for the per-token stream), and the file pages it came through released
    from this process, so the model is not resident twice."""
    src = sf.get(name)
    if src.dim() != 2 or src.element_size() != 1 or src.numel() == 0:
        raise CheckpointError(f"{sf.path}: tensor {name!r} is not a 2-D 8-bit weight")
    dst = kernels.weight_empty(src.shape[0], src.shape[1], src.dtype)
    row_bytes = src.shape[1]
    start = sf.data_start + sf.entries[name].begin
    step = max(1, (16 << 20) // row_bytes)  # 16 MB at a time: a small transient peak
    for r0 in range(0, src.shape[0], step):
        r1 = min(src.shape[0], r0 + step)
        dst[r0:r1].copy_(src[r0:r1])
        sf.release_pages(start + r0 * row_bytes, start + r1 * row_bytes)
    return dst


# --------------------------------------------------------------------------- HF config
def read_config(path: str | os.PathLike[str]) -> tuple[BitNetConfig, dict[str, Any]]:
    """Parse an HF ``config.json``; returns (config, quantization_config or {}).

    Raises CheckpointError for an unknown architecture or unsupported options.
    """
    cfg_path = Path(path) / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: missing (not an HF model directory?)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    quant = raw.get("quantization_config") or {}
    if model_type == "bitnet":
        sub_norms, act_default = True, "relu2"
    elif model_type == "llama" and quant.get("quant_method") == "bitnet":
        sub_norms, act_default = False, "silu"
    else:
        raise CheckpointError(
            f"{cfg_path}: unknown architecture (model_type={model_type!r}, "
            f"architectures={archs}); supported: BitNetForCausalLM (model_type 'bitnet') and "
            "Llama with quantization_config.quant_method 'bitnet'")
    if quant:
        if quant.get("quant_method") != "bitnet":
            raise CheckpointError(f"{cfg_path}: quantization_config.quant_method "
                                  f"{quant.get('quant_method')!r} is not supported")
        if quant.get("use_rms_norm"):
            raise CheckpointError(f"{cfg_path}: quantization_config.use_rms_norm=true "
                                  "(an RMSNorm inside every BitLinear) is not supported")
        extra = [m for m in quant.get("modules_to_not_convert") or [] if "lm_head" not in m]
        if extra:
            raise CheckpointError(f"{cfg_path}: modules_to_not_convert={extra}: float "
                                  "projections inside the layers are not supported")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise CheckpointError(f"{cfg_path}: rope_type {rope_type!r} is not supported")
    theta = rope.get("rope_theta", raw.get("rope_theta", 500000.0))
    try:
        config = BitNetConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            num_key_value_heads=int(raw.get("num_key_value_heads")
                                    or raw["num_attention_heads"]),
            head_dim=int(raw.get("head_dim") or 0),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hidden_act=str(raw.get("hidden_act", act_default)),
            sub_norms=sub_norms,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id") or [],
            pad_token_id=raw.get("pad_token_id"),
        )
    except KeyError as exc:
        raise CheckpointError(f"{cfg_path}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from None
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise CheckpointError(f"{cfg_path}: attention_bias / mlp_bias are not supported")
    return config, quant


# --------------------------------------------------------------------------- loading
@dataclass
class LoadInfo:
    """What :func:`load_model` loaded and how long it took."""

    path: str
    format: str  # "hf-packed", "hf-float" or "r3mes"
    head: str
    seconds: float
    weights_sha256: str | None = None
    files: list[str] = field(default_factory=list)


class _TensorSource:
    """Tensors by name across one or more safetensors files of an HF directory."""

    def __init__(self, root: Path) -> None:
        index = root / "model.safetensors.index.json"
        single = root / "model.safetensors"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if single.exists():
            sf = _open_safetensors(single)
            self.files[single.name] = sf
            self.where = dict.fromkeys(sf.keys(), sf)
        elif index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index "
                                      "(needs a 'weight_map' object)") from None
            for name, fname in weight_map.items():
                if fname not in self.files:
                    shard = root / fname
                    if Path(fname).name != fname:
                        raise CheckpointError(f"{index}: shard name {fname!r} is not a plain "
                                              "file name")
                    self.files[fname] = _open_safetensors(shard)
                sf = self.files[fname]
                if name not in sf:
                    raise CheckpointError(f"{sf.path}: missing tensor {name!r} (listed in "
                                          f"{index.name})")
                self.where[name] = sf
        else:
            raise CheckpointError(f"{root}: no model.safetensors or "
                                  "model.safetensors.index.json (only safetensors is accepted)")

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        sf = self.where.get(name)
        if sf is None:
            files = ", ".join(str(f.path) for f in self.files.values())
            raise CheckpointError(f"{files}: missing tensor {name!r}")
        t = sf.get(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{sf.path}: tensor {name!r} has shape {list(t.shape)}, "
                                  f"expected {list(shape)}")
        return t

    def file_of(self, name: str) -> Path:
        return self.where[name].path


_linear_shapes = linear_shapes  # (out, in) of each projection: the model's table


def _norm_names(cfg: BitNetConfig, i: int) -> list[tuple[str, int]]:
    p = f"model.layers.{i}."
    out = [(p + "input_layernorm.weight", cfg.hidden_size),
           (p + "post_attention_layernorm.weight", cfg.hidden_size)]
    if cfg.sub_norms:
        out += [(p + "self_attn.attn_sub_norm.weight", cfg.num_attention_heads * cfg.head_dim),
                (p + "mlp.ffn_sub_norm.weight", cfg.intermediate_size)]
    return out


def unpack_hf_ternary(packed: torch.Tensor) -> torch.Tensor:
    """transformers' offline packing, uint8 [R, in] -> int8 ternary [4R, in].

    Bits ``2i..2i+1`` of byte ``[r, c]`` hold ``w[i*R + r, c] + 1``.
    """
    p = packed.to(torch.uint8)
    codes = torch.stack([(p >> (2 * i)) & 3 for i in range(4)])  # [4, R, in]
    t = codes.reshape(4 * p.shape[0], p.shape[1]).to(torch.int8) - 1
    if bool((t > 1).any()):
        raise ValueError("packed weight holds the invalid code 3")
    return t


def _load_hf(root: Path, head: str) -> tuple[BitNetForCausalLM, str]:
    cfg, quant = read_config(root)
    src = _TensorSource(root)
    offline = bool(quant) and quant.get("quantization_mode", "offline") == "offline"
    divide = quant.get("linear_class", "bitlinear") == "bitlinear"
    shapes = _linear_shapes(cfg)
    layer_linears = []
    form = "hf-packed" if offline else "hf-float"
    for i in range(cfg.num_hidden_layers):
        lin = {}
        for name in LINEAR_NAMES:
            key = f"model.layers.{i}.{name}"
            out_f, in_f = shapes[name]
            w = src.get(key + ".weight")
            try:
                if w.dtype == torch.uint8:
                    if tuple(w.shape) != ((out_f + 3) // 4, in_f) or out_f % 4:
                        raise CheckpointError(
                            f"{src.file_of(key + '.weight')}: tensor {key + '.weight'!r} has "
                            f"shape {list(w.shape)}, expected packed [{out_f // 4}, {in_f}]")
                    ws = src.get(key + ".weight_scale").float().reshape(-1)
                    if ws.numel() != 1 or not bool(torch.isfinite(ws).all()) or ws.item() <= 0:
                        raise CheckpointError(
                            f"{src.file_of(key + '.weight_scale')}: tensor "
                            f"{key + '.weight_scale'!r} must be one positive finite number")
                    s_w = ws.item() if divide else 1.0 / ws.item()
                    ternary = unpack_hf_ternary(w)
                    tw = kernels.TernaryWeight.from_ternary(ternary, s_w)
                    form = "hf-packed"
                else:
                    if tuple(w.shape) != (out_f, in_f):
                        raise CheckpointError(
                            f"{src.file_of(key + '.weight')}: tensor {key + '.weight'!r} has "
                            f"shape {list(w.shape)}, expected [{out_f}, {in_f}]")
                    if not w.is_floating_point():
                        raise CheckpointError(f"{src.file_of(key + '.weight')}: tensor "
                                              f"{key + '.weight'!r} has dtype {w.dtype}")
                    tw = kernels.quantize_weight(w)
            except (ValueError, TypeError) as exc:
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(f"{src.file_of(key + '.weight')}: tensor "
                                      f"{key + '.weight'!r}: {exc}") from None
            lin[name.split(".")[1]] = bitlinear_from_packed(tw)
        layer_linears.append(lin)
    embed = src.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    if not embed.is_floating_point():
        raise CheckpointError(f"{src.file_of('model.embed_tokens.weight')}: tensor "
                              f"'model.embed_tokens.weight' has dtype {embed.dtype}")
    if cfg.tie_word_embeddings or not src.has("lm_head.weight"):
        if not cfg.tie_word_embeddings:
            src.get("lm_head.weight")  # raises: names the missing tensor
        head_w = embed
    else:
        head_w = src.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    model = BitNetForCausalLM(cfg, embed, layer_linears, LMHead.from_float(head_w, head))
    _load_norms(model, cfg, lambda name, n: src.get(name, (n,)))
    return model, form


def _load_norms(model: BitNetForCausalLM, cfg: BitNetConfig, get) -> None:
    state = {"model.norm.weight": get("model.norm.weight", cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        for name, n in _norm_names(cfg, i):
            state[name] = get(name, n)
    for name, t in state.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        module.weight.data = t.float().contiguous()


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an r3mes model manifest (format {found!r})")
    version = manifest.get("format_version")
    if isinstance(version, int) and 1 <= version < FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is an older r3mes format; "
                              "convert the source checkpoint again with `r3mes convert`")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (this r3mes "
                              f"reads up to {FORMAT_VERSION})")
    for key in ("config", "weights_file", "weights_sha256", "head", "weight_layout"):
        if key not in manifest:
            raise CheckpointError(f"{path}: missing field {key!r}")
    if manifest["weight_layout"] != "r3mes-2bit-g256":
        raise CheckpointError(f"{path}: weight_layout {manifest['weight_layout']!r} unknown")
    return manifest


def _load_r3mes(root: Path, verify: bool,
                weights: str) -> tuple[BitNetForCausalLM, str, dict[str, Any]]:
    manifest = _read_manifest(root)
    try:
        cfg = BitNetConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{root / MANIFEST}: bad config: {exc}") from None
    wpath = root / Path(manifest["weights_file"]).name
    sf = _open_safetensors(wpath)
    if "weights_bytes" in manifest and wpath.stat().st_size != manifest["weights_bytes"]:
        raise CheckpointError(f"{wpath}: size {wpath.stat().st_size} differs from the manifest "
                              f"({manifest['weights_bytes']}): truncated or replaced")
    if verify:
        digest = file_sha256(wpath)
        if digest != manifest["weights_sha256"]:
            raise CheckpointError(f"{wpath}: sha256 {digest} does not match the manifest "
                                  f"({manifest['weights_sha256']}): the file is corrupt")

    def get(name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None,
            weight: bool = False) -> torch.Tensor:
        t = sf.get(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{wpath}: tensor {name!r} has shape {list(t.shape)}, "
                                  f"expected {list(shape)}")
        if dtype is not None and t.dtype != dtype:
            raise CheckpointError(f"{wpath}: tensor {name!r} has dtype {t.dtype}, "
                                  f"expected {dtype}")
        return _take_weight(sf, name) if weight and weights == "memory" else t

    shapes = _linear_shapes(cfg)
    layer_linears = []
    for i in range(cfg.num_hidden_layers):
        lin = {}
        for name in LINEAR_NAMES:
            key = f"model.layers.{i}.{name}"
            out_f, in_f = shapes[name]
            packed = get(key + ".packed", (out_f, (in_f + 255) // 256 * 64), torch.uint8,
                         weight=True)
            scale = float(get(key + ".weight_scale", (1,), torch.float32).item())
            if not (scale > 0 and np.isfinite(scale)):
                raise CheckpointError(f"{wpath}: tensor {key + '.weight_scale'!r} must be "
                                      "positive and finite")
            tw = kernels.TernaryWeight(packed, scale, out_f, in_f)
            lin[name.split(".")[1]] = bitlinear_from_packed(tw)
        layer_linears.append(lin)
    v, h = cfg.vocab_size, cfg.hidden_size
    embed = get("model.embed_tokens.weight", (v, h))
    if manifest["head"] == HEAD_KINDS["int8"]:
        kp = (h + 63) // 64 * 64
        head = LMHead("int8", v, h, int8=kernels.Int8Weight(
            get("lm_head.qweight", (v, kp), torch.int8, weight=True),
            get("lm_head.weight_scale", (v,), torch.float32),
            get("lm_head.row_sums", (v,), torch.int32), v, h))
    elif manifest["head"] == HEAD_KINDS["int4"]:
        hp, g = (h + 127) // 128 * 128, INT4_HEAD_GROUP
        if h > 8192:
            raise CheckpointError(f"{root / MANIFEST}: an int4 head takes at most 8192 features, "
                                  f"the model has {h}")
        head = LMHead("int4", v, h, int4=kernels.Int4Weight(
            get("lm_head.packed", (v, hp // 2), torch.uint8, weight=True),
            get("lm_head.group_scales", (v, hp // g), torch.uint8),
            get("lm_head.weight_scale", (v,), torch.float32),
            get("lm_head.offsets", (v,), torch.int32), v, h, g))
    elif manifest["head"] == HEAD_KINDS["float"]:
        head = LMHead("float", v, h, weight=get("lm_head.weight", (v, h), torch.float32))
    else:
        raise CheckpointError(f"{root / MANIFEST}: head {manifest['head']!r} unknown")
    model = BitNetForCausalLM(cfg, embed, layer_linears, head)
    _load_norms(model, cfg, lambda name, n: get(name, (n,), torch.float32))
    return model, manifest["head"], manifest


WEIGHT_MODES = ("memory", "mmap")


def load_model(path: str | os.PathLike[str], *, head: str = "int8", verify: bool = False,
               weights: str = "memory") -> tuple[BitNetForCausalLM, LoadInfo]:
    """Load a BitNet model from a local directory (HF or r3mes packed).

    Args:
        path: the directory.
        head: for HF directories, how to hold the LM head: ``"int8"`` (default, compact and
            fast) or ``"float"`` (float32, exact). An r3mes directory has its head fixed at
            conversion.
        verify: for r3mes directories, also check the weights file's sha256 against the
            manifest (reads the whole file: ~1 s per GB). Without it the header, every
            tensor's shape/dtype/offsets and the file size are still checked.
        weights: for r3mes directories, where the packed weights and the int8 head live:
            ``"memory"`` (default) copies them into weight memory on 2 MiB pages, which
            decodes ~8% faster than streaming them from the file's 4 KiB page-cache pages
            (load takes ~0.3 s longer for a 2B model; the file pages are released, so the
            weights are resident once); ``"mmap"`` keeps them as views of the file's memory
            map (fastest load, pages shared between processes that map the same file).

    Raises:
        CheckpointError: naming the file (and tensor) that is missing, malformed or corrupt.
    """
    if head not in HEAD_KINDS:
        raise ValueError(f"head: expected one of {sorted(HEAD_KINDS)}, got {head!r}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights: expected one of {list(WEIGHT_MODES)}, got {weights!r}")
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    t0 = time.perf_counter()
    if (root / MANIFEST).exists():
        model, head_kind, manifest = _load_r3mes(root, verify, weights)
        info = LoadInfo(str(root), "r3mes", head_kind, 0.0, manifest["weights_sha256"],
                        [manifest["weights_file"]])
    else:
        model, form = _load_hf(root, head)
        info = LoadInfo(str(root), form, HEAD_KINDS[head], 0.0)
    model.config.eos_token_id = _eos_ids(root, model.config.eos_token_id)
    info.seconds = time.perf_counter() - t0
    return model, info


def _eos_ids(root: Path, eos: list[int]) -> list[int]:
    """The model's EOS ids and every id ``generation_config.json`` declares (Llama-3-style
    chat models list the end-of-turn token there: ``"eos_token_id": [128001, 128009]``), in
    that order, without repeats: generation stops at any of them."""
    path = root / "generation_config.json"
    if not path.is_file():
        return list(eos)
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    extra = raw.get("eos_token_id") if isinstance(raw, dict) else None
    if extra is None:
        return list(eos)
    extra = [extra] if isinstance(extra, int) and not isinstance(extra, bool) else extra
    if not isinstance(extra, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in extra):
        raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of token "
                              f"ids, got {raw['eos_token_id']!r}")
    return list(dict.fromkeys([*eos, *extra]))


# --------------------------------------------------------------------------- convert
def model_tensors(model: BitNetForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the r3mes packed format, by name (see FORMAT)."""
    for name, lin in model.base_linears().items():
        yield name + ".packed", lin.ternary.packed
        yield name + ".weight_scale", torch.tensor([lin.ternary.scale], dtype=torch.float32)
    cfg = model.config
    yield "model.norm.weight", model.model.norm.weight.data
    for i in range(cfg.num_hidden_layers):
        for name, _ in _norm_names(cfg, i):
            yield name, model.get_submodule(name.rsplit(".", 1)[0]).weight.data
    yield "model.embed_tokens.weight", model.model.embed_tokens.weight
    if model.lm_head.kind == "int8":
        yield "lm_head.qweight", model.lm_head.int8.data
        yield "lm_head.weight_scale", model.lm_head.int8.scale
        yield "lm_head.row_sums", model.lm_head.int8.row_sums
    elif model.lm_head.kind == "int4":
        if model.lm_head.int4.group != INT4_HEAD_GROUP:
            raise ValueError(f"save_model: the r3mes format holds int4 heads in groups of "
                             f"{INT4_HEAD_GROUP}, not {model.lm_head.int4.group}")
        yield "lm_head.packed", model.lm_head.int4.packed
        yield "lm_head.group_scales", model.lm_head.int4.group_scales
        yield "lm_head.weight_scale", model.lm_head.int4.scale
        yield "lm_head.offsets", model.lm_head.int4.offsets
    else:
        yield "lm_head.weight", model.lm_head.weight


def save_model(model: BitNetForCausalLM, dst: str | os.PathLike[str],
               source: str = "") -> dict[str, Any]:
    """Write ``model`` in the r3mes packed format to directory ``dst``; returns the manifest."""
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    head = HEAD_KINDS[model.lm_head.kind]
    digest, size = write_safetensors(out / WEIGHTS_FILE, dict(model_tensors(model)),
                                      {"format": FORMAT_NAME,
                                       "format_version": str(FORMAT_VERSION)})
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "weight_layout": "r3mes-2bit-g256",
        "head": head,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": digest,
        "weights_bytes": size,
        "source": source,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
            head: str = "int8", calibration_text: str | None = None,
            calibration_tokens: int = 4096) -> dict[str, Any]:
    """Convert an HF BitNet directory into the r3mes packed format (see FORMAT), or an
    r3mes directory to another ``head`` kind.

    An HF source's head is quantised from its float weight. An r3mes source's head can only
    be re-quantised from what it stores (an int8 head to int4 rounds twice): convert from
    the HF directory when it is at hand. ``calibration_text`` (int4 only): text whose
    first ``calibration_tokens`` tokens, run through the model, weight each hidden
    feature's rounding error when the int4 head picks its scales
    (:mod:`r3mes.core.head_calibration`). The tokenizer files are copied alongside.
    Returns the manifest written.
    """
    src_path, dst_path = Path(src), Path(dst)
    if src_path.resolve() == dst_path.resolve():
        raise ValueError("convert: SRC and DST must be different directories")
    if calibration_text is not None and head != "int4":
        raise ValueError("convert: calibration text weighs the int4 head's rounding; "
                         f"it has no use with head {head!r}")
    model, _ = load_model(src_path, head="float" if calibration_text is not None else head)
    if model.lm_head.kind != head:
        importance = None
        if calibration_text is not None:
            from r3mes.core.head_calibration import hidden_importance
            from r3mes.core.tokenizer import Tokenizer

            ids = Tokenizer(src_path).encode(calibration_text)[:calibration_tokens]
            importance = hidden_importance(model, ids)
        model.lm_head = LMHead.from_float(model.lm_head.dequantized_weight(), head,
                                          group=INT4_HEAD_GROUP, importance=importance)
    manifest = save_model(model, dst_path, source=src_path.name)
    for name in TOKENIZER_FILES:
        f = src_path / name
        if f.is_file():
            with open(f, "rb") as fin, atomic_open(dst_path / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    return manifest


def _manifest_and_config(root: Path) -> tuple[dict[str, Any], BitNetConfig]:
    """An r3mes directory's manifest and the model config it records."""
    manifest = _read_manifest(root)
    try:
        return manifest, BitNetConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{root / MANIFEST}: bad config: {exc}") from None


def describe_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a model directory holds, from its config alone (no weights read): format, head
    kind, shape, and the bytes one decoded token reads (ternary layers + head), which over
    the machine's read bandwidth is the decode floor."""
    root = Path(path)
    if (root / MANIFEST).exists():
        manifest, cfg = _manifest_and_config(root)
        form, head = "r3mes", manifest["head"]
    else:
        cfg, _ = read_config(root)
        form, head = "hf", "float (quantised when loaded: --head)"
    shapes = _linear_shapes(cfg)
    ternary = sum(out * ((in_ + 255) // 256) * 64 for out, in_ in shapes.values())
    ternary *= cfg.num_hidden_layers
    v, h = cfg.vocab_size, cfg.hidden_size
    head_bytes = {HEAD_KINDS["int8"]: v * ((h + 63) // 64 * 64 + 8),
                  HEAD_KINDS["int4"]: v * ((h + 127) // 128 * 64 + (h + 127) // 128 * 2 + 8),
                  HEAD_KINDS["float"]: v * h * 4}.get(head)
    return {"path": str(root), "format": form, "head": head,
            "layers": cfg.num_hidden_layers, "hidden_size": h, "vocab_size": v,
            "ternary_bytes": ternary, "head_bytes": head_bytes,
            "bytes_per_token": None if head_bytes is None else ternary + head_bytes}


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class ModelShape:
    """What an adapter must match to fit a model, read without loading any weights.

    ``linear_shapes`` maps a projection suffix (``"self_attn.q_proj"``) to its
    ``(out_features, in_features)``; ``weights_sha256`` is the digest an r3mes directory's
    manifest records (``None`` for an HF directory, which records none).
    """

    linear_shapes: dict[str, tuple[int, int]]
    num_layers: int
    weights_sha256: str | None


def read_model_shape(path: str | os.PathLike[str]) -> ModelShape:
    """The :class:`ModelShape` of the model directory ``path`` (HF or r3mes packed), from
    its config alone. Raises :class:`CheckpointError` for a directory that is neither."""
    root = Path(path)
    if (root / MANIFEST).exists():
        manifest, cfg = _manifest_and_config(root)
        return ModelShape(_linear_shapes(cfg), cfg.num_hidden_layers, manifest["weights_sha256"])
    cfg, _ = read_config(root)
    return ModelShape(_linear_shapes(cfg), cfg.num_hidden_layers, None)


def verify_weights(path: str | os.PathLike[str]) -> str | None:
    """Check an r3mes directory's weights file against the sha256 its manifest records
    (reads the whole file, ~0.6 s a GB) and return the digest; ``None`` for an HF directory,
    which records no digest to check against. Raises :class:`CheckpointError` naming the
    file on a mismatch."""
    root = Path(path)
    if not (root / MANIFEST).exists():
        return None
    manifest = _read_manifest(root)
    wpath = root / Path(manifest["weights_file"]).name
    try:
        digest = file_sha256(wpath)
    except FileNotFoundError:
        raise CheckpointError(f"{wpath}: missing") from None
    if digest != manifest["weights_sha256"]:
        raise CheckpointError(f"{wpath}: sha256 {digest} does not match the manifest "
                              f"({manifest['weights_sha256']}): the file is corrupt; restore "
                              "it or convert the model again")
    return digest
