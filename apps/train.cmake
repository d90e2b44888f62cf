# Programs of the training area.
if(TARGET mae_train)
  # mae-pretrain is a tiny launcher that blocks SIGINT/SIGTERM and executes mae-pretrain-main, so a
  # Ctrl-C while LibTorch and ITK load is a handled stop rather than a kill (apps/launch_blocked.c).
  add_executable(mae-pretrain-main ${CMAKE_CURRENT_LIST_DIR}/pretrain.cpp)
  target_link_libraries(mae-pretrain-main PRIVATE mae_train mae_cli mae_warnings)
  # The TensorBoard validation picture is mae-reconstruct's montage (lib/infer is a leaf area beside
  # lib/train, so the program, not the trainer, links it). Without the infer area the event files
  # hold scalars only.
  if(TARGET mae_infer)
    target_link_libraries(mae-pretrain-main PRIVATE mae_infer)
    target_compile_definitions(mae-pretrain-main PRIVATE MAE3D_VALIDATION_MONTAGE=1)
  endif()
  install(TARGETS mae-pretrain-main RUNTIME DESTINATION libexec/mae3d)
  add_executable(mae-pretrain ${CMAKE_CURRENT_LIST_DIR}/launch_blocked.c)
  target_compile_definitions(mae-pretrain PRIVATE MAE3D_PROGRAM="mae-pretrain-main")
  target_compile_options(mae-pretrain PRIVATE -Wall -Wextra)
  add_dependencies(mae-pretrain mae-pretrain-main)
  install(TARGETS mae-pretrain RUNTIME DESTINATION bin)
endif()

# mae-bench --end-to-end runs the trainer, so it is part of mae-bench only where the train area is built.
if(TARGET mae_train AND TARGET mae-bench)
  target_sources(mae-bench PRIVATE ${CMAKE_CURRENT_LIST_DIR}/bench_e2e.cpp)
  target_link_libraries(mae-bench PRIVATE mae_train)
  target_compile_definitions(mae-bench PRIVATE MAE3D_BENCH_END_TO_END)
endif()
