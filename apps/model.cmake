# Programs of the model area, and the command-line helper library every program links.
add_library(mae_cli STATIC ${CMAKE_CURRENT_LIST_DIR}/cli.cpp)
target_include_directories(mae_cli PUBLIC ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(mae_cli PUBLIC mae_core CLI11::CLI11 PRIVATE mae_warnings)
if(TARGET spdlog::spdlog)
  target_link_libraries(mae_cli PUBLIC spdlog::spdlog)
  target_compile_definitions(mae_cli PRIVATE MAE3D_HAVE_SPDLOG)
endif()

mae_add_app(mae-bench ${CMAKE_CURRENT_LIST_DIR}/bench.cpp mae_model mae_optim mae_cli)
mae_add_app(mae-selftest ${CMAKE_CURRENT_LIST_DIR}/selftest.cpp mae_model mae_optim mae_cli)
# CUDA builds of LibTorch (TorchConfig sets C10_CUDA_LIBRARY and links it): mae-bench reports the
# GPU's peak memory through c10's CUDA allocator, whose header needs the CUDA runtime's headers (the
# toolkit's, or those PyPI's wheel keeps in site-packages/nvidia/*/include).
if(C10_CUDA_LIBRARY)
  file(GLOB mae_wheel_cuda_include LIST_DIRECTORIES true "${TORCH_INSTALL_PREFIX}/../nvidia/*/include")
  find_path(MAE3D_CUDA_RUNTIME_INCLUDE cuda_runtime_api.h HINTS ${CUDAToolkit_INCLUDE_DIRS} ${mae_wheel_cuda_include})
  if(MAE3D_CUDA_RUNTIME_INCLUDE)
    target_include_directories(mae-bench SYSTEM PRIVATE ${MAE3D_CUDA_RUNTIME_INCLUDE})
    target_compile_definitions(mae-bench PRIVATE MAE3D_HAVE_C10_CUDA)
  else()
    message(STATUS "mae-bench: no cuda_runtime_api.h found; it will not report the GPU's peak memory")
  endif()
endif()
