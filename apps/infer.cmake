# Programs of the inference area.
if(TARGET mae_infer)
  mae_add_app(mae-reconstruct ${CMAKE_CURRENT_LIST_DIR}/reconstruct.cpp mae_infer mae_cli)
endif()
