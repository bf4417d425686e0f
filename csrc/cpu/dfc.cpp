// DFC attention's CPU kernels: argument checks, BatchNorm arguments and the registration of _dfc_kernel and
// _dfc_backward_kernel (schemas: csrc/dfc.cpp; the math: ghostfast/reference.py). The kernels: dfc_forward.cpp and
// dfc_backward.cpp, sharing cpu/dfc.h.
#include <ATen/ATen.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "batch_norm.h"
#include "common.h"
#include "cpu/dfc.h"
#include "kernel_signatures.h"

namespace ghostfast {
namespace {

using cpu::dfc::Mode;

constexpr const char* kFwdOp = "ghostfast::_dfc_kernel (CPU)";
constexpr const char* kBwdOp = "ghostfast::_dfc_backward_kernel (CPU)";

Mode parse_mode(c10::string_view mode, const char* op) {
  const std::string m(mode.data(), mode.size());
  if (m == "gate") return Mode::kGate;
  if (m == "nearest") return Mode::kNearest;
  if (m == "bilinear") return Mode::kBilinear;
  TORCH_CHECK(false, op, ": expected mode 'gate', 'nearest' or 'bilinear', got '", m, "'");
}

// x, conv_weight, h_weight and v_weight (both kernels); returns C, the gate's channels
int64_t check_weights(const char* op, const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& h_weight,
                      const at::Tensor& v_weight) {
  check_x(x, c10::DeviceType::CPU, op);
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, op, ": expected x with H and W >= 2 (the 2x2 average pool), got ",
              x.sizes());
  const at::Tensor& cw = conv_weight;
  TORCH_CHECK(cw.defined() && cw.dim() == 4 && cw.size(1) == x.size(1) && cw.size(2) == 1 && cw.size(3) == 1, op,
              ": expected conv_weight of shape [C, ", x.size(1), ", 1, 1], got ",
              cw.defined() ? cw.sizes() : at::IntArrayRef{});
  const int64_t c = cw.size(0);
  const at::ScalarType dt = x.scalar_type();
  check_param(conv_weight, x, dt, op, "conv_weight", {c, x.size(1), 1, 1});
  check_param(h_weight, x, dt, op, "h_weight", {c, 1, 1, 5});
  check_param(v_weight, x, dt, op, "v_weight", {c, 1, 5, 1});
  return c;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t c, Mode mode) {
  if (mode == Mode::kGate) return {x.size(0), c, x.size(2) / 2, x.size(3) / 2};
  return {x.size(0), c, x.size(2), x.size(3)};
}

void dfc_forward_cpu(const at::Tensor& x, const at::Tensor& conv_weight, const std::optional<at::Tensor>& bn3_weight,
                     const std::optional<at::Tensor>& bn3_bias, const std::optional<at::Tensor>& bn3_mean,
                     const std::optional<at::Tensor>& bn3_var, double bn3_eps, const at::Tensor& h_weight,
                     const std::optional<at::Tensor>& bn4_weight, const std::optional<at::Tensor>& bn4_bias,
                     const std::optional<at::Tensor>& bn4_mean, const std::optional<at::Tensor>& bn4_var,
                     double bn4_eps, const at::Tensor& v_weight, const std::optional<at::Tensor>& bn5_weight,
                     const std::optional<at::Tensor>& bn5_bias, const std::optional<at::Tensor>& bn5_mean,
                     const std::optional<at::Tensor>& bn5_var, double bn5_eps, c10::string_view mode_str,
                     const at::Tensor& out) {
  const Mode mode = parse_mode(mode_str, kFwdOp);
  const int64_t c = check_weights(kFwdOp, x, conv_weight, h_weight, v_weight);
  const BatchNormArgs bn3 = batch_norm_args(bn3_weight, bn3_bias, bn3_mean, bn3_var, bn3_eps, c, x, kFwdOp, "bn3");
  const BatchNormArgs bn4 = batch_norm_args(bn4_weight, bn4_bias, bn4_mean, bn4_var, bn4_eps, c, x, kFwdOp, "bn4");
  const BatchNormArgs bn5 = batch_norm_args(bn5_weight, bn5_bias, bn5_mean, bn5_var, bn5_eps, c, x, kFwdOp, "bn5");
  check_output(out, x, kFwdOp, "out", out_shape(x, c, mode));
  if (out.numel() == 0) return;
  const bool cl = pick_channels_last(kFwdOp, x, {{"out", out}});
  cpu::dfc::forward(x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode, cl, out);
}

void dfc_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& conv_weight,
                      const at::Tensor& conv_scale, const at::Tensor& conv_bias, const at::Tensor& h_weight,
                      const at::Tensor& h_scale, const at::Tensor& h_bias, const at::Tensor& v_weight,
                      const at::Tensor& v_scale, const at::Tensor& v_bias, c10::string_view mode_str,
                      at::TensorList grads) {
  const Mode mode = parse_mode(mode_str, kBwdOp);
  const int64_t c = check_weights(kBwdOp, x, conv_weight, h_weight, v_weight);
  const at::ScalarType dt = x.scalar_type(), acc = acc_type(dt);
  const at::Tensor params[9] = {conv_weight, conv_scale, conv_bias, h_weight, h_scale,
                                h_bias,      v_weight,   v_scale,   v_bias};
  static const char* const param_names[9] = {"conv_weight", "conv_scale", "conv_bias", "h_weight", "h_scale",
                                              "h_bias",      "v_weight",   "v_scale",   "v_bias"};
  static const char* const names[10] = {
      "grads[0] (x)",       "grads[1] (conv_weight)", "grads[2] (conv_scale)", "grads[3] (conv_bias)",
      "grads[4] (h_weight)", "grads[5] (h_scale)",    "grads[6] (h_bias)",     "grads[7] (v_weight)",
      "grads[8] (v_scale)", "grads[9] (v_bias)"};
  for (int i : {1, 2, 4, 5, 7, 8}) check_param(params[i], x, acc, kBwdOp, param_names[i], {c});
  check_output(grad, x, kBwdOp, "grad", out_shape(x, c, mode));
  TORCH_CHECK(grads.size() == 10, kBwdOp,
              ": expected 10 tensors in grads (x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, ",
              "v_weight, v_scale, v_bias; empty = not needed), got ", grads.size());
  bool need[10];
  for (int i = 0; i < 10; ++i) {
    need[i] = grad_requested(grads[i]);
    if (!need[i]) continue;
    if (i == 0) {
      check_output(grads[0], x, kBwdOp, names[0], x.sizes());
    } else {
      const at::Tensor& like = params[i - 1];
      check_param(grads[i], x, like.scalar_type(), kBwdOp, names[i], like.sizes());
    }
  }
  std::vector<std::pair<const char*, at::Tensor>> dense;  // empty tensors have no layout to check
  if (grad.numel() > 0) dense.emplace_back("grad", grad);
  if (need[0]) dense.emplace_back(names[0], grads[0]);
  const bool cl = pick_channels_last(kBwdOp, x, dense);
  bool any = false;
  for (bool b : need) any = any || b;
  if (!any) return;
  cpu::dfc::backward(grad, x, params, mode, cl, grads, need);
}

}  // namespace
}  // namespace ghostfast

static_assert(std::is_same_v<decltype(ghostfast::dfc_forward_cpu), ghostfast::DfcKernel>,
              "dfc_forward_cpu: C++ signature differs from kernel_signatures.h");
static_assert(std::is_same_v<decltype(ghostfast::dfc_backward_cpu), ghostfast::DfcBackwardKernel>,
              "dfc_backward_cpu: C++ signature differs from kernel_signatures.h");

TORCH_LIBRARY_IMPL(ghostfast, CPU, m) {
  m.impl("_dfc_kernel", &ghostfast::dfc_forward_cpu);
  m.impl("_dfc_backward_kernel", &ghostfast::dfc_backward_cpu);
}
