# The fused kernel: one translation unit per instruction set, each with its own -m flags (never
# -march=native); cp_conv_fused.cpp (baseline flags) picks one at run time from the CPU's features.
target_sources(_core PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_generic.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_avx2.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_avx512.cpp
  ${CMAKE_CURRENT_LIST_DIR}/bind_fused.cpp)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64|i.86")
  set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_avx2.cpp
    PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma")
  set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cp_conv_fused_avx512.cpp
    PROPERTIES COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx2;-mfma")
endif()
