"""A pool of KV-cache blocks shared by every sequence a serving engine runs.

Continuous batching gives each sequence its own cache that grows and frees independently
of the others. The keys and values of all of them live in one preallocated pool of
fixed-size blocks ``[layers, num_blocks, kv_heads, block_size, head_dim]`` (on the CPU); a
sequence owns a list of blocks (its *block table*) and position ``s`` of it is
at offset ``s % block_size`` of its block ``s // block_size``. The pool is sized once, from a
budget in tokens or megabytes, so the memory a node uses for its caches is known before the
first request; when it is full, new requests wait (see :mod:`r3mes.serving.engine`).

The blocks hold float32 by default. ``dtype=torch.float16`` (opt-in) halves the memory a
position takes (twice the sequences in the same budget) and the bytes a decode step reads
of the cache; every key and value is stored rounded to the nearest half (IEEE, ties to
even) and read back exactly, the arithmetic staying float32. It is lossy: the answers can
differ from a float32 cache's (measured in BENCHMARKS.md, "16-bit KV cache").

The native decode layer (``csrc/model/``) reads and writes the blocks directly; the torch
reference path of :meth:`r3mes.core.model.BitNetForCausalLM.decode_paged` gathers them.
"""

from __future__ import annotations

import math

import torch

from r3mes.core.model import BitNetConfig
from r3mes.errors import R3mesError

__all__ = ["KV_DTYPES", "KVBlockPool", "KVCacheFull"]

#: The cache element types by their config names.
KV_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class KVCacheFull(R3mesError, RuntimeError):
    """The pool has fewer free blocks than a request needs."""


class KVBlockPool:
    """``num_blocks`` cache blocks of ``block_size`` positions each, for every layer.

    Args:
        config: the model's architecture (layers, kv heads, head size).
        num_blocks: blocks in the pool (>= 1).
        block_size: positions a block holds (>= 1).
        dtype: torch.float32 (default) or torch.float16 (see the module notes).
    """

    def __init__(self, config: BitNetConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32) -> None:
        if dtype not in KV_DTYPES.values():
            raise ValueError(f"KV cache dtype must be float32 or float16, got {dtype}")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        shape = (config.num_hidden_layers, num_blocks, config.num_key_value_heads, block_size,
                 config.head_dim)
        # Zero pages: the memory becomes resident as blocks are first written.
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        # A stack: blocks released last are handed out first (still warm in cache).
        self._free = list(range(num_blocks - 1, -1, -1))

    @staticmethod
    def bytes_per_token(config: BitNetConfig, dtype: torch.dtype = torch.float32) -> int:
        """Keys and values of one position, all layers."""
        size = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * size

    @classmethod
    def from_budget(cls, config: BitNetConfig, *, tokens: int | None = None,
                    megabytes: float | None = None, block_size: int = 16,
                    max_tokens: int | None = None,
                    dtype: torch.dtype = torch.float32) -> KVBlockPool:
        """A pool holding ``tokens`` positions, or as many as fit in ``megabytes`` (MiB);
        never more than ``max_tokens`` when given (more could never be used)."""
        if (tokens is None) == (megabytes is None):
            raise ValueError("give the KV budget as tokens or as megabytes (exactly one)")
        if tokens is None:
            if not (math.isfinite(megabytes) and megabytes > 0):
                raise ValueError(f"KV budget: megabytes must be > 0, got {megabytes!r}")
            tokens = int(megabytes * 2**20 // cls.bytes_per_token(config, dtype))
        if max_tokens is not None:
            tokens = min(tokens, max_tokens)
        if tokens < block_size:
            raise ValueError(f"KV budget of {tokens} tokens is below one block ({block_size})")
        return cls(config, tokens // block_size, block_size, dtype)

    # ---- accounting -------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence of ``tokens`` positions needs."""
        return -(-max(0, tokens) // self.block_size)

    def allocate(self, count: int) -> list[int]:
        """``count`` free blocks (all or none); KVCacheFull when fewer are free."""
        if count > len(self._free):
            raise KVCacheFull(f"the KV cache has {len(self._free)} free blocks of "
                              f"{self.block_size} positions, {count} are needed")
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        """Give blocks back (a finished or cancelled sequence)."""
        self._free.extend(reversed(blocks))

    # ---- data ---------------------------------------------------------------------------
    def write(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a sequence's first ``T`` positions: k, v ``[layers, kv_heads, T, head_dim]``."""
        count = k.shape[2]
        if self.blocks_for(count) > len(blocks):
            raise ValueError(f"{count} positions need {self.blocks_for(count)} blocks, "
                             f"the sequence has {len(blocks)}")
        bs = self.block_size
        for i in range(self.blocks_for(count)):
            n = min(bs, count - i * bs)
            self.k[:, blocks[i], :, :n] = k[:, :, i * bs:i * bs + n]
            self.v[:, blocks[i], :, :n] = v[:, :, i * bs:i * bs + n]

    def gather(self, layer: int, blocks: list[int], length: int) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
        """Keys and values ``[kv_heads, length, head_dim]`` (float32) of one sequence at
        ``layer``."""
        idx = torch.as_tensor(blocks[:self.blocks_for(length)], dtype=torch.long)
        k = self.k[layer, idx].transpose(0, 1).reshape(self.k.shape[2], -1, self.k.shape[4])
        v = self.v[layer, idx].transpose(0, 1).reshape(self.v.shape[2], -1, self.v.shape[4])
        return (k[:, :length].to(torch.float32).contiguous(),
                v[:, :length].to(torch.float32).contiguous())

    @staticmethod
    def table(block_lists: list[list[int]]) -> torch.Tensor:
        """The block tables of a batch as one int32 tensor [B, longest] (padded with 0)."""
        width = max((len(b) for b in block_lists), default=0) or 1
        out = torch.zeros(len(block_lists), width, dtype=torch.int32)
        for i, blocks in enumerate(block_lists):
            out[i, :len(blocks)] = torch.as_tensor(blocks, dtype=torch.int32)
        return out
