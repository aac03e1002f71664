// y[m, :] = (x[m, :] - mean) / sqrt(variance + epsilon) · scale + bias: the layer norm of the
// few rows of a decode or verify step, as an XLA FFI custom call on CPU.
//
// Why a kernel of our own: XLA on CPU runs a layer norm of one 768-wide row as five or six
// small programs of 2-4 µs each (the mean, the variance, the scaling...), and a decode step
// of tiny_starcoder_py has 41 of them: 0.6-0.7 ms of a 13 ms int8 step. Here it is one call.
// The variance is taken around the mean (two passes), in float32 (layer_norm.h). Where an int8
// product follows the norm, int8_matmul.cc takes it instead, in the same call.

#include <cstdint>

#include "layer_norm.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error LayerNorm(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, float epsilon) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || scale.element_count() != xd[1] || bias.element_count() != xd[1]) {
    return ffi::Error::InvalidArgument("layer_norm: x [M, K], scale [K] and bias [K] expected");
  }
  starcoder::NormalizeRows(x.typed_data(), xd[0], xd[1], scale.typed_data(), bias.typed_data(),
                           epsilon, y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StarcoderLayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));
