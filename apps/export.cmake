# Programs of the export area.
if(TARGET mae_export)
  mae_add_app(mae-export ${CMAKE_CURRENT_LIST_DIR}/export.cpp mae_export mae_cli)
endif()
