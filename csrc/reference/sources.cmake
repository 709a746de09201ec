target_sources(_core PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/cp_conv_reference.cpp
  ${CMAKE_CURRENT_LIST_DIR}/bind_reference.cpp)
