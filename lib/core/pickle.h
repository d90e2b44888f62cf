// torch.load-able files written from C++ without torch::jit::pickle_save's type tags.
#pragma once

#include <ATen/core/ivalue.h>

#include <vector>

namespace mae {

/// The bytes of a torch.save-style archive (data.pkl, data/<tensor>, version) holding `value`.
/// torch::jit::pickle_save pickles typed containers such as c10::Dict<std::string, Tensor> through
/// torch.jit._pickle.restore_type_tag, a global that torch.load's weights_only mode (the default
/// since PyTorch 2.6) refuses; this pickles them as plain dicts and lists, as Python's torch.save does,
/// so torch.load(path) reads the file on 1.13 and 2.x alike.
std::vector<char> pickle_untagged(const c10::IValue& value);

}  // namespace mae
