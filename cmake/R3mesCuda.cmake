# R3MES_CUDA=AUTO builds r3mes._native_cuda when a CUDA compiler is found,
# ON requires one, OFF skips it. The module never links libtorch: it takes
# device pointers as integers (tensor.data_ptr()) and a stream handle, so one
# wheel serves any torch build.
if(R3MES_CUDA STREQUAL "OFF")
  set(R3MES_HAVE_CUDA OFF)
else()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(R3MES_HAVE_CUDA ON)
  elseif(R3MES_CUDA STREQUAL "ON")
    message(FATAL_ERROR "R3MES_CUDA=ON but no CUDA compiler was found")
  else()
    set(R3MES_HAVE_CUDA OFF)
    message(STATUS "r3mes: no CUDA compiler found, building the CPU module only")
  endif()
endif()

if(R3MES_HAVE_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    # A100 (sm_80) and H100/H200 (sm_90) machine code, plus sm_90 PTX that the
    # driver can JIT on newer GPUs. The kernels use mma.sync and dp4a (sm_80+).
    set(CMAKE_CUDA_ARCHITECTURES 80-real 90)
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  # Every .cu kernel and the host-side layout/emulation .cpp files of csrc/cuda
  # (bindings_cuda.cpp among them).
  file(GLOB R3MES_CUDA_SOURCES CONFIGURE_DEPENDS
       "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu"
       "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cpp")
  pybind11_add_module(_native_cuda ${R3MES_CUDA_SOURCES})
  target_include_directories(_native_cuda PRIVATE csrc)
  find_package(CUDAToolkit REQUIRED)
  target_link_libraries(_native_cuda PRIVATE CUDA::cudart_static)
  target_compile_definitions(_native_cuda PRIVATE R3MES_VERSION="${SKBUILD_PROJECT_VERSION}")
  target_compile_options(_native_cuda PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo -Xcompiler=-Wall,-Wextra>
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>)
  install(TARGETS _native_cuda DESTINATION r3mes)
  message(STATUS "r3mes: building r3mes._native_cuda for architectures ${CMAKE_CUDA_ARCHITECTURES}")
endif()
