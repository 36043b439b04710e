# Per-file SIMD flags: each kernel variant lives in a file whose name ends in
# _avx2.cpp, _avx512.cpp, _avx512vnni.cpp or _amx.cpp and is compiled for that ISA only;
# the dispatcher (compiled for the baseline ISA) picks one at run time from
# the CPU's features, so one binary runs on any x86-64 machine.
function(r3mes_apply_simd_flags sources)
  if(NOT CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
    return()
  endif()
  foreach(src IN LISTS sources)
    if(src MATCHES "_amx\\.cpp$")
      set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS
        "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx512vnni;-mamx-tile;-mamx-int8;-mfma;-mavx2;-mbmi2")
    elseif(src MATCHES "_avx512vnni\\.cpp$")
      set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS
        "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx512vnni;-mfma;-mavx2;-mbmi2")
    elseif(src MATCHES "_avx512\\.cpp$")
      set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS
        "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mfma;-mavx2;-mbmi2")
    elseif(src MATCHES "_avx2\\.cpp$")
      set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mbmi2")
    endif()
  endforeach()
endfunction()

# AMX kernels (_amx.cpp) need a compiler that knows the tile instructions (GCC 11+,
# Clang 12+) and an x86-64 target: without them the files are left out and
# `have_var` is OFF (the dispatcher then never picks AMX).
function(r3mes_filter_amx_sources sources_var have_var)
  include(CheckCXXCompilerFlag)
  set(have OFF)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
    check_cxx_compiler_flag("-mamx-tile -mamx-int8" R3MES_COMPILER_AMX)
    if(R3MES_COMPILER_AMX)
      set(have ON)
    endif()
  endif()
  if(NOT have)
    set(kept ${${sources_var}})
    list(FILTER kept EXCLUDE REGEX "_amx\\.cpp$")
    set(${sources_var} ${kept} PARENT_SCOPE)
  endif()
  set(${have_var} ${have} PARENT_SCOPE)
endfunction()
