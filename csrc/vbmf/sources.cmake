target_sources(_core PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/vbmf_solver.cpp
  ${CMAKE_CURRENT_LIST_DIR}/bind_vbmf.cpp)
