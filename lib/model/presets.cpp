#include "model/presets.h"

#include "core/error.h"

namespace mae {

MaskedAutoencoderOptions benchmark_preset(const std::string& name, int64_t& batch) {
  if (name == "A") {
    batch = 2;
    return MaskedAutoencoderOptions(1, {96, 96, 96}, {16, 16, 16})
        .hidden_size(768)
        .mlp_dim(3072)
        .num_layers(12)
        .num_heads(12)
        .decoder_hidden_size(384)
        .decoder_mlp_dim(512)
        .decoder_num_layers(4)
        .decoder_num_heads(12)
        .masking_ratio(0.75);
  }
  if (name == "B") {
    batch = 4;
    return MaskedAutoencoderOptions(1, {64, 64, 64}, {16, 16, 16})
        .hidden_size(384)
        .mlp_dim(1536)
        .num_layers(6)
        .num_heads(6)
        .decoder_hidden_size(384)
        .decoder_mlp_dim(512)
        .decoder_num_layers(4)
        .decoder_num_heads(12)
        .masking_ratio(0.75);
  }
  if (name == "tiny") {
    batch = 2;
    return MaskedAutoencoderOptions(1, {32, 32, 32}, {8, 8, 8})
        .hidden_size(96)
        .mlp_dim(192)
        .num_layers(2)
        .num_heads(4)
        .decoder_hidden_size(48)
        .decoder_mlp_dim(96)
        .decoder_num_layers(1)
        .decoder_num_heads(4);
  }
  throw ConfigError("--preset \"" + name + "\" is not a preset; choose A, B or tiny");
}

}  // namespace mae
