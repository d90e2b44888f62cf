#include "train/trained_model.h"

#include "core/error.h"
#include "train/checkpoint.h"

namespace mae {

TrainedModel load_trained_model(const std::string& path) {
  TrainedModel t;
  t.dir = resolve_checkpoint(path);
  const auto info = read_checkpoint_info(t.dir);
  t.step = info.step;
  try {
    t.config = config_from_json(info.config);
  } catch (const ConfigError& e) {
    throw CheckpointError(t.dir + "/config.json: " + e.what());
  }
  t.model = MaskedAutoencoder(model_options_from(t.config.model));
  load_model(t.dir, *t.model);
  t.model->eval();
  return t;
}

}  // namespace mae
