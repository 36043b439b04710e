#pragma once
namespace r3mes::cuda {
// Number of CUDA devices visible (0 without a driver or GPU: never an error).
int device_count();
// Writes the compute capabilities this module carries code for (e.g. 80, 90)
// into out (up to capacity) and returns how many there are.
int compiled_architectures(int* out, int capacity);
// Multiprocessor count of the current device (cached per device).
int multiprocessor_count();
}  // namespace r3mes::cuda
