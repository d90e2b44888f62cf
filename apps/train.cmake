# Programs of the training area.
if(TARGET mae_train)
  mae_add_app(mae-pretrain ${CMAKE_CURRENT_LIST_DIR}/pretrain.cpp mae_train mae_cli)
endif()
