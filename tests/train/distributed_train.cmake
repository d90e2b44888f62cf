# Data-parallel mae-pretrain (c10d, Gloo on the CPU): each case starts its ranks as separate
# processes with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, one thread each. Included from
# tests/train/CMakeLists.txt; ctest label "distributed" (scripts/test.sh -L distributed).
if(TARGET mae-pretrain)
  if(TARGET mae_run)
    set(mae_distributed_test_run_lib mae_run)
  else()
    set(mae_distributed_test_run_lib mae_train)
  endif()
  add_executable(test_distributed_train ${CMAKE_CURRENT_LIST_DIR}/test_distributed_train.cpp)
  target_link_libraries(test_distributed_train PRIVATE ${mae_distributed_test_run_lib} mae_io ${TORCH_LIBRARIES}
                        nlohmann_json::nlohmann_json GTest::gtest GTest::gtest_main mae_warnings)
  target_compile_definitions(test_distributed_train PRIVATE MAE_PRETRAIN_BIN="$<TARGET_FILE:mae-pretrain>"
                                                            MAE3D_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  add_dependencies(test_distributed_train mae-pretrain)
  # Each case runs in seconds; every child process is killed at its own deadline (60-120 s), and
  # TIMEOUT is the backstop for the whole case. RUN_SERIAL: the timing checks (a lost rank is noticed
  # within timeout_s) should not compete with other tests for the cores.
  gtest_discover_tests(test_distributed_train PROPERTIES LABELS "distributed" TIMEOUT 420 RUN_SERIAL TRUE
                       DISCOVERY_TIMEOUT 120)
endif()
