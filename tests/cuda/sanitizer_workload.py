"""Runs every CUDA kernel on the odd test shapes, for compute-sanitizer (memcheck).

Invoked by tests/cuda/test_cuda_kernels.py under ``compute-sanitizer --tool memcheck``;
it only exercises the kernels (the parity tests check the values). Exits non-zero if a
result is not finite where it must be.
"""

from __future__ import annotations

import sys

import torch

from r3mes import kernels
from r3mes.kernels import cuda


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    for n, k in [(1, 1), (3, 255), (1001, 257), (17, 1000), (5, 63)]:
        tw = kernels.quantize_weight(torch.randn(n, k, generator=gen))
        w = cuda.CudaTernaryWeight.from_cpu(tw)
        for m in (1, 2, 7, 33):
            x = torch.randn(m, k, generator=gen).cuda()
            for kernel in ("gemv", "mma"):
                y = cuda.ternary_linear(x, w, torch.randn(n).cuda(), kernel=kernel)
                cuda.ternary_matmul_int(torch.randint(-128, 128, (m, k), dtype=torch.int8).cuda(),
                                        w, kernel=kernel)
                ads = []
                for e, rank in enumerate((4, 16, 8)):
                    a = torch.randn(rank, k, generator=gen) * 0.05
                    b = torch.randn(n, rank, generator=gen) * 0.05
                    g = torch.rand(n, generator=gen) + 0.5
                    storage = "fp16" if e % 2 == 0 else "fp32"
                    ads.append(cuda.prepare_dora_adapter_cuda(a, b, g, 2.0 / rank, storage))
                mix = torch.rand(m, 3, generator=gen)
                mix[0] = 0.0
                yd = cuda.dora_linear(x, w, ads, mix, torch.randn(n), torch.rand(m), kernel=kernel)
                if not (torch.isfinite(y).all() and torch.isfinite(yd).all()):
                    print(f"non-finite output at n={n} k={k} m={m} kernel={kernel}")
                    return 1
        a = torch.randn(8, k, generator=gen)
        b = torch.randn(n, 8, generator=gen)
        cuda.dora_row_norms(w, a.cuda(), b.cuda(), 0.5)
    torch.cuda.synchronize()
    print("sanitizer workload done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
