# Programs of the probe area.
if(TARGET mae_probe)
  mae_add_app(mae-probe ${CMAKE_CURRENT_LIST_DIR}/probe.cpp mae_probe mae_cli)
endif()
