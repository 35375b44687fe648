// flexquant::Error: the one exception type of the engine.
//
// Every failure the engine reports -- a malformed model file, a bad argument, a CUDA error --
// is a flexquant::Error. Errors about a model file start with the file's path and name the
// offending value, e.g.
//   "model.fq: tensor 'blk.0.attn_q.planes' offset 123456 + size 4096 exceeds the file (100000 bytes)"
// The Python module raises it as flexquant_rt._core.FlexquantError (a ValueError).
#pragma once

#include <stdexcept>
#include <string>

namespace flexquant {

class Error : public std::runtime_error {
public:
    explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace flexquant
