#include "run/trained_model.h"

#include "core/error.h"
#include "run/checkpoint.h"

namespace mae {

TrainedModel load_trained_model(const std::string& path) {
  const CheckpointReadLock lock = lock_checkpoint(path);
  TrainedModel t;
  t.dir = lock.dir();
  const auto info = read_checkpoint_info(t.dir);
  t.step = info.step;
  t.run_id = info.run_id;
  t.diverged = info.diverged;
  t.diverged_reason = info.diverged_reason;
  try {
    t.config = config_from_json(info.config);
  } catch (const ConfigError& e) {
    throw CheckpointError(t.dir + "/config.json: " + e.what());
  }
  t.model = MaskedAutoencoder(model_options_from(t.config.model));
  load_model(t.dir, *t.model, info);
  t.model->eval();
  return t;
}

std::string diverged_warning(const TrainedModel& trained) {
  if (!trained.diverged) return "";
  return "checkpoint " + trained.dir + " is marked diverged (" + trained.diverged_reason +
         "); its weights may be meaningless";
}

}  // namespace mae
