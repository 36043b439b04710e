#pragma once
// R3MES_CLONES: a function compiled three times (x86-64-v4 = AVX-512, v3 = AVX2 + FMA, and
// the baseline) with the best picked when the library loads. For the loops of the decode
// path that run on one thread between the kernels' pool hand-offs (norms, residual adds,
// attention), where the baseline's SSE2 would leave the other workers waiting.
//
// GCC contracts a * b + c into an FMA in the v3 / v4 clones (-ffp-contract=fast is the
// GNU default), which rounds once instead of twice, so a clone may round differently from
// the baseline. Every row of a batch runs the same clone as a row alone, so those stay
// bit-identical; a loop that must also equal the PyTorch reference op for op is cloned
// only if no product in it feeds an add (or the product is exact, as float squares summed
// in double).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define R3MES_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define R3MES_CLONES
#endif
