# Two-process tests of lib/train/distributed.* over 127.0.0.1 (fork()ed ranks; label "distributed").
# Included from tests/train/CMakeLists.txt.
if(TARGET mae_distributed)
  add_executable(test_distributed_group ${CMAKE_CURRENT_LIST_DIR}/test_distributed_group.cpp)
  target_link_libraries(test_distributed_group PRIVATE mae_distributed GTest::gtest GTest::gtest_main mae_warnings)
  gtest_discover_tests(test_distributed_group PROPERTIES LABELS distributed TIMEOUT 120 DISCOVERY_TIMEOUT 120)
endif()
