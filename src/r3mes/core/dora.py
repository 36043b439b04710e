"""DoRA experts on the ternary backbone: :class:`BitLinearDoRA`.

Exact DoRA (Liu et al. 2024) as HF PEFT implements it (DESIGN.md, "DoRA contract"). For one
adapter with A [r, in], B [out, r], magnitude m [out] and scaling s = alpha/r (alpha/sqrt(r)
with rsLoRA)::

    y = g * (W0 x + s B (A x)) + bias,      g = m / ||W0 + s B A||_row

where W0 = T / s_w is the dequantised ternary weight. A mix of adapters with weights w_i
(normalised to sum 1) is ``sum_i w_i y_i``: one ternary GEMM shared by all adapters plus a
rank-r update each, which is what the fused kernel (:func:`r3mes.kernels.dora_linear`) runs.

What each path sees (a decision, documented here because PEFT never meets it):

* the **base path** ``W0 x`` quantises x to int8 per token exactly as :class:`BitLinear`
  does, so with no adapter the layer is bit-for-bit the bare BitLinear;
* the **adapter path** ``B (A x)`` sees the float x. That is what PEFT does on a BitNet
  model (its LoRA branch receives the module input, the quantisation happens inside the
  base layer), so an adapter trained with PEFT on HF BitNet applies here unchanged.

``quantize_activations=False`` makes the base path a float ``x W0^T`` (plain torch): the
layer is then exactly PEFT's DoRA over ``nn.Linear(W0)``; the parity tests use it.

Training: :meth:`BitLinearDoRA.add_adapter` creates trainable A, B, m (paper init: B = 0,
A Kaiming-uniform, m = ||W0||_row, so a fresh adapter changes nothing). The row norm is
recomputed from the current A, B at every forward and detached, as the paper's section 4.3
and PEFT do. The base never receives gradients; gradients do flow through it to x (a
straight-through estimator for the activation quantisation), so adapters in earlier layers
train. Inference: :meth:`BitLinearDoRA.load_adapter` computes the factored row norms once
(the "merge" step) and keeps a compact kernel copy; with the native module the forward is
one fused kernel call.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from r3mes import kernels
from r3mes.core.bitlinear import BitLinear, _ste_quantize_activations, _ste_quantize_weight
from r3mes.kernels import cuda

__all__ = ["BitLinearDoRA", "MixSpec", "apply_dora", "cuda_adapter", "dora_forward_cuda",
           "dora_modules", "set_adapter_mix"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

# Process-wide serials for "this layer's mix or adapter set changed": never reused, so a
# cached view of the mixes (the native decode layers') is stale exactly when one moved.
_SERIALS = itertools.count(1)

#: A mix: None (base only), [(name, weight), ...] for every row, or one such list per batch
#: element (an empty list there means base only for that element).
MixSpec = None | Sequence[tuple[str, float]] | Sequence[Sequence[tuple[str, float]]]


@dataclass
class _AdapterMeta:
    rank: int
    alpha: float
    use_rslora: bool
    scaling: float
    trainable: bool


@dataclass
class _Prepared:
    """Per-adapter derived state, valid while the parameters' versions are unchanged."""

    norm_key: tuple[int, ...] | None = None
    norms: torch.Tensor | None = None  # float64 [out], detached
    kernel_key: tuple[int, ...] | None = None
    kernel: kernels.DoRAKernelAdapter | None = None
    extra: dict[str, object] = field(default_factory=dict)


class _ParamTable(nn.Module):
    """name -> Parameter, like nn.ParameterDict but any adapter name works: parameters live
    only in ``_parameters``, so a name such as ``copy`` or ``keys`` cannot clash with an
    attribute. state_dict keys are ``<table>.<name>`` (``lora_A.medical``)."""

    def __getitem__(self, name: str) -> nn.Parameter:
        return self._parameters[name]  # type: ignore[return-value]

    def __setitem__(self, name: str, param: nn.Parameter) -> None:
        self._parameters[name] = param

    def __delitem__(self, name: str) -> None:
        del self._parameters[name]

    def __contains__(self, name: object) -> bool:
        return name in self._parameters

    def __len__(self) -> int:
        return len(self._parameters)


class _TernaryLinearSTE(torch.autograd.Function):
    """Frozen ternary base: the kernel forward, a straight-through backward to x.

    The backward treats the activation quantisation as identity (as BitNet training does)
    and uses W0, dequantised on the fly so no float copy of the weight stays resident.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: BitLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return kernels.ternary_linear(x.contiguous(), layer.ternary)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w0 = ctx.layer.ternary.dequantize()
        return grad.to(torch.float32) @ w0, None


def _row_key(row: Sequence[object]) -> tuple | None:
    """A hashable key of a mix row's (name, weight) items, or None for a row that cannot be
    one (its items are then checked by _normalise, which names what is wrong)."""
    try:
        key = tuple(tuple(item) if isinstance(item, list) else item for item in row)
        hash(key)
    except TypeError:
        return None
    return key


class BitLinearDoRA(nn.Module):
    """A :class:`BitLinear` with any number of named DoRA adapters and a per-row mix.

    Args:
        base: the BitLinear to adapt (frozen/packed or float); its parameters stop
            receiving gradients.
        quantize_activations: int8-quantise x on the base path as BitLinear does (default).
            False gives the float reference ``x W0^T`` (PEFT parity).
        storage: kernel storage of loaded adapters, ``"fp16"`` (compact, default) or
            ``"fp32"`` (exact).

    Parameters are registered PEFT-style: ``lora_A.<name>`` [r, in], ``lora_B.<name>``
    [out, r], ``lora_magnitude_vector.<name>`` [out].
    """

    def __init__(
        self, base: BitLinear, *, quantize_activations: bool = True, storage: str = "fp16"
    ) -> None:
        super().__init__()
        if not isinstance(base, BitLinear):
            raise TypeError(f"base: expected a BitLinear, got {type(base).__name__}")
        if storage not in kernels.ADAPTER_STORAGES:
            raise ValueError(
                f"storage: expected one of {kernels.ADAPTER_STORAGES}, got {storage!r}"
            )
        self.base = base
        base.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.mix_serial = next(_SERIALS)
        self._quantize_activations = bool(quantize_activations)
        self.storage = storage
        self.lora_A = _ParamTable()
        self.lora_B = _ParamTable()
        self.lora_magnitude_vector = _ParamTable()
        self._meta: dict[str, _AdapterMeta] = {}
        self._prepared: dict[str, _Prepared] = {}
        self._mix: list[tuple[str, float]] | list[list[tuple[str, float]]] | None = None
        self._mix_hetero = False
        # (names, matrix, base weights) of a homogeneous mix, built once per set_mix.
        self._mix_cache: tuple[list[str], torch.Tensor, torch.Tensor | None] | None = None
        self._mix_cache_key: tuple[int, ...] | None = None
        self._w0: torch.Tensor | None = None  # dense W0, only for quantize_activations=False

    @property
    def quantize_activations(self) -> bool:
        """int8-quantise x on the base path (BitLinear's arithmetic); False: float W0 x."""
        return self._quantize_activations

    @quantize_activations.setter
    def quantize_activations(self, value: bool) -> None:
        self._quantize_activations = bool(value)
        self.mix_serial = next(_SERIALS)  # which path runs changed: cached plans are stale

    # ---- adapters ------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters held, in insertion order."""
        return list(self._meta)

    def adapter_config(self, name: str) -> dict[str, float | int | bool]:
        """rank, alpha, use_rslora, scaling and trainable of one adapter."""
        m = self._get_meta(name)
        return {"rank": m.rank, "alpha": m.alpha, "use_rslora": m.use_rslora,
                "scaling": m.scaling, "trainable": m.trainable}

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"adapter name {name!r}: use letters, digits, '_' or '-'")
        if name in self._meta:
            raise ValueError(f"adapter {name!r} already exists; remove_adapter() it first")

    def _get_meta(self, name: str) -> _AdapterMeta:
        try:
            return self._meta[name]
        except KeyError:
            raise KeyError(f"no adapter named {name!r} (have {self.adapter_names})") from None

    def _w0_dense(self) -> torch.Tensor:
        """W0 as float32; cached only for a frozen base (its weights cannot change)."""
        if not self.base.frozen:
            return self.base.dequantized_weight()
        if self._w0 is None:
            self._w0 = self.base.dequantized_weight()
        return self._w0

    @staticmethod
    def _scaling(rank: int, alpha: float, use_rslora: bool) -> float:
        return alpha / math.sqrt(rank) if use_rslora else alpha / rank

    def add_adapter(self, name: str, rank: int, alpha: float, use_rslora: bool = False) -> None:
        """A fresh trainable adapter, initialised as the paper (and PEFT): B = 0,
        A Kaiming-uniform (a = sqrt(5)), m = ||W0||_row; it leaves the output unchanged."""
        self._check_new_name(name)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected a positive int, got {rank!r}")
        if not math.isfinite(float(alpha)) or float(alpha) <= 0:
            raise ValueError(f"alpha: expected a positive finite number, got {alpha!r}")
        a = torch.empty(rank, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, rank)
        m = self._row_norms_of(a, b, 0.0).float()
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.lora_magnitude_vector[name] = nn.Parameter(m)
        scaling = self._scaling(rank, float(alpha), use_rslora)
        self._meta[name] = _AdapterMeta(rank, float(alpha), bool(use_rslora), scaling, True)
        self._prepared[name] = _Prepared()
        self.mix_serial = next(_SERIALS)

    def load_adapter(
        self,
        name: str,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        magnitude: torch.Tensor,
        scaling: float,
        *,
        alpha: float | None = None,
        use_rslora: bool = False,
    ) -> None:
        """An inference adapter (no gradients). Validates shapes and values, then does the
        "merge" step once: factored row norms, the gain g = m / norm and the kernel copy.

        ``alpha``/``use_rslora`` are only recorded (for saving); the math uses ``scaling``.
        Raises ValueError naming the offending tensor.
        """
        self._check_new_name(name)
        a, b = kernels._check_adapter_tensors(lora_A, lora_B, self.out_features,
                                              self.in_features)
        m = magnitude.detach().to(torch.float32).contiguous()
        if m.shape != (self.out_features,):
            raise ValueError(
                f"magnitude: expected shape ({self.out_features},), got {tuple(m.shape)}"
            )
        for label, t in (("lora_A", a), ("lora_B", b), ("magnitude", m)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{label}: contains NaN or Inf")
        scaling = float(scaling)
        if not math.isfinite(scaling):
            raise ValueError(f"scaling: must be finite, got {scaling}")
        rank = a.shape[0]
        if alpha is None:
            alpha = scaling * (math.sqrt(rank) if use_rslora else rank)
        # Parameters without gradients: the adapter is visible in state_dict like a
        # trainable one, but the optimizer never sees it.
        self.lora_A[name] = nn.Parameter(a.clone(), requires_grad=False)
        self.lora_B[name] = nn.Parameter(b.clone(), requires_grad=False)
        self.lora_magnitude_vector[name] = nn.Parameter(m.clone(), requires_grad=False)
        self._meta[name] = _AdapterMeta(rank, float(alpha), bool(use_rslora), scaling, False)
        self._prepared[name] = _Prepared()
        self.mix_serial = next(_SERIALS)
        try:
            self._kernel_adapter(name)
        except Exception:
            self.remove_adapter(name)
            raise

    def remove_adapter(self, name: str) -> None:
        """Drop an adapter (a mix still naming it fails at the next forward)."""
        self._get_meta(name)
        del self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name]
        del self._meta[name], self._prepared[name]
        self.mix_serial = next(_SERIALS)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Detached float32 copies: ``lora_A`` [r, in], ``lora_B`` [out, r],
        ``lora_magnitude_vector`` [out]."""
        self._get_meta(name)
        return {
            "lora_A": self.lora_A[name].detach().clone(),
            "lora_B": self.lora_B[name].detach().clone(),
            "lora_magnitude_vector": self.lora_magnitude_vector[name].detach().clone(),
        }

    # ---- derived state: norms and kernel copies ----------------------------------------

    def _row_norms_of(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        if self.base.frozen:
            # A base on a GPU computes them there; they live with the adapter's parameters.
            return kernels.dora_row_norms(self.base.ternary, a, b, scaling).to(a.device)
        w0 = self._w0_dense().double()
        return torch.linalg.vector_norm(w0 + scaling * (b.double() @ a.double()), dim=1)

    def _versions(self, name: str, with_m: bool) -> tuple[int, ...]:
        # In-place updates (optimizer steps, load_state_dict) bump a tensor's version, so
        # a cache keyed on versions is invalidated by every training step.
        # Plain dict lookups: this runs for every adapter on every decode step, and
        # nn.Module.__getattr__ would cost more than the rest of the step's Python.
        tables = self._modules
        a = tables["lora_A"]._parameters[name]
        b = tables["lora_B"]._parameters[name]
        key = (id(a), a._version, id(b), b._version)
        if with_m:
            mv = tables["lora_magnitude_vector"]._parameters[name]
            key += (id(mv), mv._version)
        return key

    def row_norms(self, name: str) -> torch.Tensor:
        """||W0 + s B A||_row (float64 [out], detached) of the adapter's current values."""
        meta = self._get_meta(name)
        prep = self._prepared[name]
        key = self._versions(name, with_m=False)
        if prep.norm_key != key or prep.norms is None:
            with torch.no_grad():
                prep.norms = self._row_norms_of(
                    self.lora_A[name].detach(), self.lora_B[name].detach(), meta.scaling
                )
            prep.norm_key = key
        return prep.norms

    def _kernel_adapter(self, name: str) -> kernels.DoRAKernelAdapter:
        meta = self._get_meta(name)
        prep = self._prepared[name]
        key = self._versions(name, with_m=True) + (hash(self.storage),)
        if prep.kernel_key != key or prep.kernel is None:
            g = kernels.dora_gain(self.lora_magnitude_vector[name], self.row_norms(name))
            prep.kernel = kernels.prepare_dora_adapter(
                self.lora_A[name].detach(), self.lora_B[name].detach(), g, meta.scaling,
                self.storage,
            )
            prep.kernel_key = key
        return prep.kernel

    # ---- the mix -------------------------------------------------------------------------

    @staticmethod
    def _normalise(entries: Iterable[tuple[str, float]], where: str) -> list[tuple[str, float]]:
        merged: dict[str, float] = {}
        for item in entries:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"{where}: expected (name, weight) pairs, got {item!r}")
            name, w = item
            w = float(w)
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"{where}: weight of {name!r} must be finite and >= 0, got {w}")
            merged[name] = merged.get(name, 0.0) + w
        total = sum(merged.values())
        if merged and total <= 0:
            raise ValueError(f"{where}: weights sum to 0")
        return [(n, w / total) for n, w in merged.items() if w > 0]

    def set_mix(self, mix: MixSpec, *, missing: str = "error") -> None:
        """Select the adapters applied by :meth:`forward`.

        * ``None`` (or ``[]``): base only.
        * ``[(name, weight), ...]``: the same mix for every row; weights are normalised to
          sum 1 (negative or non-finite weights are refused).
        * ``[[(name, weight), ...], ...]``: heterogeneous, one mix per batch element
          (``len == x.shape[0]``); for x [B, T, in] all T tokens of element b use mix b.
          An empty inner list means base only for that element.

        ``missing``: what a name this layer does not hold means. ``"error"`` (default)
        raises KeyError; ``"base"`` counts its weight for the bare base output, which is
        what an expert that does not adapt this layer contributes (:func:`set_adapter_mix`
        uses it, so a mix of experts covering different layers is exact everywhere).
        """
        if missing not in ("error", "base"):
            raise ValueError(f"missing: expected 'error' or 'base', got {missing!r}")
        if mix is None or (isinstance(mix, (list, tuple)) and len(mix) == 0):
            self._mix, self._mix_hetero, self._mix_cache = None, False, None
            self.mix_serial = next(_SERIALS)
            return
        if not isinstance(mix, (list, tuple)):
            raise TypeError(f"mix: expected None or a list, got {type(mix).__name__}")
        hetero = all(isinstance(e, (list, tuple)) and (len(e) == 0 or isinstance(e[0], (list,
                     tuple))) for e in mix)
        if hetero:
            # A batch of prompt tokens repeats each sequence's mix once a token: each
            # distinct row is checked and resolved once, and the equal rows share its list
            # (which _mix_matrix relies on to build each distinct row's weights once).
            seen: dict[object, list[tuple[str, float]]] = {}
            rows = []
            for i, e in enumerate(mix):
                key = _row_key(e)
                row = seen.get(key) if key is not None else None
                if row is None:
                    row = self._normalise(e, f"mix[{i}]")
                    if key is not None:
                        seen[key] = row
                rows.append(row)
            distinct = list({id(row): row for row in rows}.values())
            names = {n for row in distinct for n, _ in row}
        else:
            rows = self._normalise(mix, "mix")
            names = {n for n, _ in rows}
        for n in names:
            if missing == "error" or n is None:
                self._get_meta(n)

        def resolve(row: list[tuple[str, float]]) -> list[tuple[str | None, float]]:
            # None stands for the bare base output; merge the missing names into it.
            out: dict[str | None, float] = {}
            for n, w in row:
                key = n if n in self._meta else None
                out[key] = out.get(key, 0.0) + w
            return list(out.items())

        if missing == "base":
            if hetero:
                resolved = {id(r): resolve(r) for r in distinct}
                rows = [resolved[id(r)] for r in rows]
            else:
                rows = resolve(rows)
        self._mix, self._mix_hetero = rows, hetero
        self._mix_cache = None
        self.mix_serial = next(_SERIALS)

    @property
    def mix(self) -> list[tuple[str, float]] | list[list[tuple[str, float]]] | None:
        """The current (normalised) mix."""
        return self._mix

    def _mix_matrix(
        self, x: torch.Tensor | torch.Size
    ) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        """Adapter names in use, the per-token weight matrix [1 or M, E] and the per-token
        weight of the bare base output [1 or M] (None when no entry is "base")."""
        shape = x if isinstance(x, torch.Size) else x.shape
        # Cached until the mix changes (set_mix), for a heterogeneous mix per shape of x.
        key = tuple(shape[:-1]) if self._mix_hetero else None
        if self._mix_cache is not None and self._mix_cache_key == key:
            names = self._mix_cache[0]
            for n in names:
                if n not in self._meta:
                    raise KeyError(f"adapter {n!r} in the mix was removed; call set_mix() again")
            return self._mix_cache
        if self._mix_hetero:
            rows = self._mix
            if len(shape) < 2 or shape[0] != len(rows):
                raise ValueError(
                    f"heterogeneous mix has {len(rows)} entries but x has shape "
                    f"{tuple(shape)} (the first dimension must match)"
                )
        else:
            rows = [self._mix]
        # Each distinct row (the same list object: set_mix resolves equal rows to one) once.
        position: dict[int, int] = {}
        index = [position.setdefault(id(row), len(position)) for row in rows]
        unique = list({id(row): row for row in rows}.values())  # in the order of `position`
        # One order for every mix, by name: a row's terms are then summed in the same order
        # alone or batched with rows of other mixes, so its result is the same bit for bit.
        names = sorted({n for row in unique for n, _ in row if n is not None})
        mat = torch.zeros(len(unique), len(names))
        base_w = torch.zeros(len(unique))
        for b, row in enumerate(unique):
            for n, w in row:
                if n is None:
                    base_w[b] += w
                else:
                    mat[b, names.index(n)] = w
        if len(unique) != len(rows):
            pick = torch.tensor(index)
            mat, base_w = mat[pick], base_w[pick]
        if self._mix_hetero:
            per_elem = math.prod(shape[1:-1])
            if per_elem != 1:
                mat = mat.repeat_interleave(per_elem, dim=0)
                base_w = base_w.repeat_interleave(per_elem, dim=0)
        for n in names:
            if n not in self._meta:
                raise KeyError(f"adapter {n!r} in the mix was removed; call set_mix() again")
        out = names, mat, (base_w if bool((base_w != 0).any()) else None)
        self._mix_cache, self._mix_cache_key = out, key
        return out

    def runs_in_native_decode(self) -> bool:
        """Whether the native decode layer can run this projection: a frozen ternary base
        without bias, on the quantised-activation path."""
        return self.quantize_activations and self.base.frozen and self.base.bias is None

    def mix_parameters(self) -> list[torch.Tensor]:
        """The trainable parameters the current mix reads: an optimizer step updates them
        in place (bumping their ``_version``) without touching :attr:`mix_serial`.
        Inference adapters are frozen; ``load_state_dict`` bumps the serial itself."""
        if self._mix is None:
            return []
        rows = self._mix if self._mix_hetero else [self._mix]
        names = {n for row in rows for n, _ in row if n is not None}
        tables = self._modules
        params = (tables[t]._parameters[n] for n in sorted(names)
                  for t in ("lora_A", "lora_B", "lora_magnitude_vector"))
        return [p for p in params if p.requires_grad]

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self.mix_serial = next(_SERIALS)  # adapter values may have changed in place

    def decode_kernel_mix(
        self, batch: int
    ) -> tuple[tuple[object, ...], torch.Tensor | None, torch.Tensor | None] | None:
        """The mix as the native decode layer takes it for a batch of ``batch`` rows:
        ``(kernel adapters, mix [1 or batch, E], base weight [1 or batch] or None)``, or
        None when the layer runs the bare base. Raises RuntimeError when the layer cannot
        run in the fused kernel (float base path, bias, no native kernel copy)."""
        if not self.runs_in_native_decode():
            raise RuntimeError("this layer cannot run in the native decode layer")
        if self._mix is None:
            return None
        names, mat, base_w = self._mix_matrix(torch.Size((batch, 1, self.in_features)))
        if not names:
            return None
        natives = tuple(self._kernel_adapter(n).native for n in names)
        if any(n is None for n in natives):
            raise RuntimeError("adapter has no native kernel copy")
        return natives, mat, base_w

    # ---- forward ---------------------------------------------------------------------------

    def _base_float(self, x2: torch.Tensor) -> torch.Tensor:
        """W0 x (no bias) as float32 [M, out], differentiable with respect to x."""
        if not self.quantize_activations:
            return F.linear(x2, self._w0_dense())
        if self.base.frozen:
            return _TernaryLinearSTE.apply(x2, self.base)
        w = _ste_quantize_weight(self.base.weight.float())
        return F.linear(_ste_quantize_activations(x2), w)

    def _base_only(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_activations:
            return self.base(x)
        y = F.linear(x.float(), self._w0_dense(), None if self.base.bias is None
                     else self.base.bias.float())
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype, with the current mix applied."""
        if self._mix is None:
            return self._base_only(x)
        names, mat, base_w = self._mix_matrix(x)
        if not names:
            return self._base_only(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or any(self.lora_A[n].requires_grad or self.lora_B[n].requires_grad
                   or self.lora_magnitude_vector[n].requires_grad for n in names)
        )
        use_kernel = (self.base.frozen and self.quantize_activations and not needs_grad
                      and kernels.use_native() and x.device.type == "cpu")
        bias = self.base.bias
        if x.device.type == "cuda":
            # A model on a GPU (r3mes.core.backends.cuda_model): the fused CUDA kernel.
            y = dora_forward_cuda(self, x2, names, mat, base_w, needs_grad)
        elif use_kernel:
            adapters = [self._kernel_adapter(n) for n in names]
            y = kernels.dora_linear(x2.contiguous(), self.base.ternary, adapters, mat, bias,
                                    base_w)
        else:
            y = self._forward_torch(x2.float(), names, mat, base_w)
            if bias is not None:
                y = y + bias.float()
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _forward_torch(
        self, x2: torch.Tensor, names: list[str], mat: torch.Tensor, base_w: torch.Tensor | None
    ) -> torch.Tensor:
        """The differentiable path: g = m / norm.detach(), PEFT's formula per adapter."""
        base = self._base_float(x2)
        mat = mat.expand(x2.shape[0], len(names))
        y = torch.zeros_like(base)
        for e, n in enumerate(names):
            meta = self._meta[n]
            norms = self.row_norms(n)
            m = self.lora_magnitude_vector[n]
            g = m / norms.to(m.dtype).clamp(min=torch.finfo(m.dtype).tiny)
            g = torch.where(norms > 0, g, torch.zeros_like(g))
            lora = (x2 @ self.lora_A[n].t()) @ self.lora_B[n].t()
            y = y + mat[:, e : e + 1] * (g * (base + meta.scaling * lora))
        if base_w is not None:
            y = y + base_w.reshape(-1, 1) * base
        no_expert = (mat != 0).sum(dim=1, keepdim=True) == 0
        if bool(no_expert.any()):
            y = torch.where(no_expert, base, y)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={self.adapter_names}, storage={self.storage}, "
                f"quantize_activations={self.quantize_activations}")


# ---- on a GPU ---------------------------------------------------------------------------------
# What a BitLinearDoRA runs for CUDA inputs (a model moved by
# r3mes.core.backends.cuda_model.move_model_to_cuda): the device copies of its adapters and
# the fused CUDA kernel. Here, beside the module, so core never imports core.backends.


def cuda_adapter(module: BitLinearDoRA, name: str,
                 device: torch.device | None = None) -> cuda.CudaDoRAAdapter:
    """The CUDA kernel copy of adapter ``name`` of ``module`` on ``device`` (default: the
    base weight's). Made from the CPU-prepared adapter (same storage, same values) and
    cached with it: a new copy only when the adapter was prepared again (its parameters
    or the module's storage changed)."""
    kernel = module._kernel_adapter(name)
    if device is None:
        device = module.base.ternary.device
    prep = module._prepared[name]
    hit = prep.extra.get("cuda")
    if hit is None or hit[0] is not kernel or hit[1].device != device:
        hit = (kernel, cuda.CudaDoRAAdapter.from_cpu(kernel, device))
        prep.extra["cuda"] = hit
    return hit[1]


def _device_mix(module: BitLinearDoRA, mat: torch.Tensor, base_w: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mix matrix and base weights on the device, copied once per mix: the mix only
    changes with ``mix_serial`` (and a heterogeneous one with the batch shape). Device
    tensors also keep the kernel call free of host copies, so it can be graph-captured."""
    key = (module.mix_serial, tuple(mat.shape), device)
    hit = module.__dict__.get("_cuda_mix")
    if hit is None or hit[0] != key:
        mat_d = mat.detach().to(device=device, dtype=torch.float32).contiguous()
        bw_d = (None if base_w is None
                else base_w.detach().to(device=device, dtype=torch.float32).contiguous())
        hit = (key, mat_d, bw_d)
        module.__dict__["_cuda_mix"] = hit
    return hit[1], hit[2]


def dora_forward_cuda(module: BitLinearDoRA, x2: torch.Tensor, names: list[str],
                      mat: torch.Tensor, base_w: torch.Tensor | None,
                      needs_grad: bool) -> torch.Tensor:
    """``module``'s mixed output for CUDA x2 [M, in] -> float32 [M, out] (no bias added
    twice: the kernel adds it): one fused CUDA DoRA call for all the experts."""
    weight = module.base.ternary
    if not isinstance(weight, cuda.CudaTernaryWeight):
        raise RuntimeError(
            f"BitLinearDoRA: input on {x2.device} but the base weight is not on a GPU "
            "(move the model with r3mes.core.backends.cuda_model.move_model_to_cuda)"
        )
    if needs_grad or not module.quantize_activations:
        raise RuntimeError(
            "BitLinearDoRA on a GPU runs inference only (int8-quantised base path, no "
            "gradients); train adapters on the CPU model"
        )
    dev = weight.device
    adapters = [cuda_adapter(module, n, dev) for n in names]
    mat_d, bw_d = _device_mix(module, mat, base_w, dev)
    return cuda.dora_linear(x2.contiguous(), weight, adapters, mat_d, module.base.bias, bw_d)


# ---- model-level helpers --------------------------------------------------------------------


def dora_modules(model: nn.Module) -> dict[str, BitLinearDoRA]:
    """Every BitLinearDoRA in a model by module path (``model.layers.0.self_attn.q_proj``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BitLinearDoRA)}


def set_adapter_mix(model: nn.Module, mix: MixSpec) -> int:
    """Call :meth:`BitLinearDoRA.set_mix` on every BitLinearDoRA in ``model``; returns how
    many modules were set.

    An expert that does not adapt some layer contributes the bare base output there
    (``missing="base"``), as in PEFT. A name that no module holds raises KeyError, and
    then no module is changed."""
    mods = list(dora_modules(model).values())
    held = {n for m in mods for n in m.adapter_names}
    if mix:
        rows = mix if all(isinstance(e, (list, tuple)) and (len(e) == 0 or isinstance(
            e[0], (list, tuple))) for e in mix) else [mix]
        for row in rows:
            for item in row:
                if isinstance(item, (list, tuple)) and item and item[0] not in held:
                    raise KeyError(f"no module of the model holds an adapter named {item[0]!r}")
    previous = [(m._mix, m._mix_hetero) for m in mods]
    try:
        for m in mods:
            m.set_mix(mix, missing="base")
    except Exception:
        for m, (mx, het) in zip(mods, previous, strict=True):
            m._mix, m._mix_hetero, m._mix_cache = mx, het, None
            m.mix_serial = next(_SERIALS)
        raise
    return len(mods)


def apply_dora(
    model: nn.Module,
    target_modules: Sequence[str] | None = None,
    *,
    quantize_activations: bool = True,
    storage: str = "fp16",
) -> list[str]:
    """Replace BitLinear modules of ``model`` by BitLinearDoRA wrappers, in place.

    ``target_modules``: last path components to wrap (``["q_proj", "v_proj"]``); None wraps
    every BitLinear. Returns the wrapped module paths. Already wrapped modules are kept.
    """
    targets = None if target_modules is None else set(target_modules)
    wrapped = []
    for path, module in list(model.named_modules()):
        if not isinstance(module, BitLinear) or path.endswith(".base"):
            continue
        leaf = path.rsplit(".", 1)[-1]
        if targets is not None and leaf not in targets:
            continue
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        if isinstance(parent, BitLinearDoRA):
            continue
        setattr(parent, leaf, BitLinearDoRA(module, quantize_activations=quantize_activations,
                                            storage=storage))
        wrapped.append(path)
    return wrapped
