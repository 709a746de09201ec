# CP-ALS: kernels (cp_als.cpp) on the BLAS/LAPACK of the scipy-openblas32 wheel, bindings apart.
target_sources(_core PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/cp_als.cpp
  ${CMAKE_CURRENT_LIST_DIR}/bind_cp_als.cpp)

# scipy-openblas32 is a build requirement and a runtime dependency; ask the wheel where it lives.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import scipy_openblas32 as s; print(s.get_include_dir()); print(s.get_lib_dir()); print(s.get_library(fullname=True))"
  OUTPUT_VARIABLE _cpconv_openblas_info
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _cpconv_openblas_result)
if(NOT _cpconv_openblas_result EQUAL 0)
  message(FATAL_ERROR "cpconv: cannot import scipy_openblas32 (pip install scipy-openblas32)")
endif()
string(REPLACE "\n" ";" _cpconv_openblas_info "${_cpconv_openblas_info}")
list(GET _cpconv_openblas_info 0 CPCONV_OPENBLAS_INCLUDE_DIR)
list(GET _cpconv_openblas_info 1 CPCONV_OPENBLAS_LIB_DIR)
list(GET _cpconv_openblas_info 2 CPCONV_OPENBLAS_LIB_FILE)
message(STATUS "cpconv: scipy-openblas32 ${CPCONV_OPENBLAS_LIB_DIR}/${CPCONV_OPENBLAS_LIB_FILE}")

target_include_directories(_core PRIVATE ${CPCONV_OPENBLAS_INCLUDE_DIR})
target_link_libraries(_core PRIVATE ${CPCONV_OPENBLAS_LIB_DIR}/${CPCONV_OPENBLAS_LIB_FILE})
# At run time the library is found next door in site-packages (cpconv/../scipy_openblas32/lib); the
# Python package also imports scipy_openblas32 first, which loads it by the same soname.
set_property(TARGET _core APPEND PROPERTY INSTALL_RPATH "$ORIGIN/../scipy_openblas32/lib")
