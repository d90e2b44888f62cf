# Programs of the model area, and the command-line helper library every program links.
add_library(mae_cli STATIC ${CMAKE_CURRENT_LIST_DIR}/cli.cpp)
target_include_directories(mae_cli PUBLIC ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(mae_cli PUBLIC mae_core CLI11::CLI11 PRIVATE mae_warnings)
if(TARGET spdlog::spdlog)
  target_link_libraries(mae_cli PUBLIC spdlog::spdlog)
  target_compile_definitions(mae_cli PRIVATE MAE3D_HAVE_SPDLOG)
endif()

mae_add_app(mae-bench ${CMAKE_CURRENT_LIST_DIR}/bench.cpp mae_model mae_optim mae_cli)
