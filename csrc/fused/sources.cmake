# The fused kernel: one translation unit per instruction set, each with its own -m flags (never
# -march=native); cp_conv_fused.cpp (baseline flags) picks one at run time from the CPU's features.
target_sources(_core PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_generic.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_avx2.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_avx512.cpp
  ${CMAKE_CURRENT_LIST_DIR}/bind_fused.cpp)
# The kernel units are compiled without LTO (pybind11_add_module turns it on for the target): whole-
# program optimisation must not inline or merge code across units built for different instruction
# sets, or instructions of one could end up on another's path.
set(_cpconv_no_lto "")
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  set(_cpconv_no_lto "-fno-lto")
endif()
set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_generic.cpp
  PROPERTIES COMPILE_OPTIONS "${_cpconv_no_lto}")
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64|i.86")
  set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_avx2.cpp
    PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;${_cpconv_no_lto}")
  set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_avx512.cpp
    PROPERTIES COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx2;-mfma;-mprfchw;${_cpconv_no_lto}")
endif()
