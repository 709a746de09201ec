target_sources(_core PRIVATE ${CMAKE_CURRENT_LIST_DIR}/bind_vbmf.cpp)
