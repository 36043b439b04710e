#pragma once
namespace r3mes::cuda {
int device_count();
}
