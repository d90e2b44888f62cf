# Programs of the data area: the pre-flight check and the data-pipeline benchmark.
if(NOT MAE3D_MODEL_ONLY)
  find_package(ZLIB REQUIRED)  # the benchmark writes its int16 CT as gzip NIfTI itself
  mae_add_app(mae-check-data ${CMAKE_CURRENT_LIST_DIR}/check_data.cpp mae_data mae_cli)
  mae_add_app(mae-bench-data ${CMAKE_CURRENT_LIST_DIR}/bench_data.cpp mae_data mae_cli ZLIB::ZLIB)
endif()
