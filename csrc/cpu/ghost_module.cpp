// The Ghost module's CPU kernels: argument checks, BatchNorm arguments and the registration of _ghost_module_kernel,
// _ghost_module_backward_kernel (and its _bnstats twin), _ghost_module_stats_kernel and
// _ghost_module_stats_backward_kernel (schemas:
// csrc/ghost_module.cpp; the math: ghostfast/reference.py). The kernels: ghost_module_{forward,backward,stats}.cpp,
// sharing cpu/ghost_module.h; accumulation in acc_t (float for float / half / bfloat16, double for double).
#include <ATen/ATen.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "batch_norm.h"
#include "common.h"
#include "cpu/depthwise.h"
#include "cpu/ghost_module.h"
#include "kernel_signatures.h"

namespace ghostfast {
namespace {

using cpu::ghost_module::Geometry;
using cpu::ghost_module::Needs;
using cpu::ghost_module::StatsGradient;

constexpr const char* kFwdOp = "ghostfast::_ghost_module_kernel (CPU)";
constexpr const char* kBwdOp = "ghostfast::_ghost_module_backward_kernel (CPU)";
constexpr const char* kStatsOp = "ghostfast::_ghost_module_stats_kernel (CPU)";
constexpr const char* kBnStatsBwdOp = "ghostfast::_ghost_module_backward_bnstats_kernel (CPU)";
constexpr const char* kStatsBwdOp = "ghostfast::_ghost_module_stats_backward_kernel (CPU)";
constexpr const char* kZ1Op = "ghostfast::_ghost_module_z1_kernel (CPU)";
constexpr const char* kZ1BwdOp = "ghostfast::_ghost_module_z1_backward_kernel (CPU)";
constexpr const char* kZ1StatsOp = "ghostfast::_ghost_module_z1_stats_kernel (CPU)";

// x, primary_weight and cheap_weight (every kernel); sets every field of the geometry but oc and what depends on it
// (n_x1, n_cheap, n_src, R), the layout (set_layout) and the gate's. z1_in (the _z1 kernels): x is z1 = W1 x' itself,
// [N, init, H, W] float / double, and there is no primary_weight (w1 undefined).
Geometry check_common(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, int64_t act,
                      bool z1_in = false) {
  check_x(x, c10::DeviceType::CPU, op);
  const at::ScalarType dt = x.scalar_type();
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.HW = g.H * g.W;
  g.act = check_act(op, act);

  if (z1_in) {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": expected z1 of dtype float32 or float64, got ", dt);
    TORCH_CHECK(g.C >= 1, op, ": expected z1 with at least one channel, got shape ", x.sizes());
    g.init = g.C;
    g.z1_in = true;
  } else {
    TORCH_CHECK(w1.defined() && w1.dim() == 4, op, ": expected primary_weight of shape [init, C_in, 1, 1], got ",
                w1.defined() ? w1.sizes() : at::IntArrayRef{});
    g.init = w1.size(0);
    TORCH_CHECK(g.init >= 1, op, ": expected primary_weight with at least one output channel, got shape ",
                w1.sizes());
    check_param(w1, x, dt, op, "primary_weight", {g.init, g.C, 1, 1});
  }

  TORCH_CHECK(w2.defined() && w2.dim() == 4, op, ": expected cheap_weight of shape [init*(ratio-1), 1, dw, dw], got ",
              w2.defined() ? w2.sizes() : at::IntArrayRef{});
  const int64_t cheap = w2.size(0);
  g.K = w2.size(3);
  TORCH_CHECK(cheap >= g.init && cheap % g.init == 0, op, ": expected cheap_weight.shape[0] a positive multiple of ",
              "init = ", g.init, " (init * (ratio - 1)), got ", cheap);
  TORCH_CHECK(cpu::depthwise_size_supported(g.K), op, ": expected a depthwise size dw of 1, 3, 5 or 7, got ",
              "cheap_weight of shape ", w2.sizes());
  check_param(w2, x, dt, op, "cheap_weight", {cheap, 1, g.K, g.K});
  g.rm1 = cheap / g.init;
  g.KK = g.K * g.K;
  return g;
}

// the channels kept: sets oc, n_x1, n_cheap, n_src, R
void set_out_channels(Geometry& g, int64_t out_channels) {
  g.oc = out_channels;
  g.n_x1 = std::min(g.init, g.oc);
  g.n_cheap = std::max<int64_t>(g.oc - g.init, 0);
  g.n_src = cpu::div_up(g.n_cheap, g.rm1);
  g.R = g.n_cheap > 0 ? g.K / 2 : 0;
}

// the Ghost module kernels: out_channels, gate, gate_mode
Geometry check_module_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                           int64_t out_channels, int64_t act, const std::optional<at::Tensor>& gate,
                           c10::string_view gate_mode, bool z1_in = false) {
  Geometry g = check_common(op, x, w1, w2, act, z1_in);
  const int64_t cheap = g.init * g.rm1;
  TORCH_CHECK(out_channels >= 1 && out_channels <= g.init + cheap, op, ": expected 1 <= out_channels <= ",
              g.init + cheap, " (init * ratio), got ", out_channels);
  set_out_channels(g, out_channels);

  const std::string mode(gate_mode.data(), gate_mode.size());
  TORCH_CHECK(mode == "nearest" || mode == "bilinear", op, ": expected gate_mode 'nearest' or 'bilinear', got '",
              mode, "'");
  g.bilinear = mode == "bilinear";
  g.gated = gate.has_value() && gate->defined();
  if (g.gated) {
    const at::Tensor& gt = *gate;
    TORCH_CHECK(gt.dim() == 4 && gt.size(0) == g.N && gt.size(1) == g.oc, op, ": expected gate of shape [", g.N, ", ",
                g.oc, ", Hg, Wg], got ", gt.sizes());
    check_param(gt, x, x.scalar_type(), op, "gate", gt.sizes());
    g.Hg = gt.size(2);
    g.Wg = gt.size(3);
    TORCH_CHECK(g.N * g.HW == 0 || (g.Hg >= 1 && g.Wg >= 1), op,
                ": expected a non-empty gate plane, got gate of shape ", gt.sizes());
  }
  return g;
}

// the statistics kernels: stage 1 keeps the x1 channels only (z1), stage 2 every cheap channel (z2)
Geometry check_stats_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, int64_t act,
                          int64_t stage) {
  TORCH_CHECK(stage == 1 || stage == 2, op, ": expected stage 1 (statistics of z1 = conv1x1(x)) or 2 (of z2, the ",
              "cheap depthwise's output), got ", stage);
  Geometry g = check_common(op, x, w1, w2, act);
  set_out_channels(g, stage == 1 ? g.init : g.init * (1 + g.rm1));
  return g;
}

// `grads` of a backward kernel: which are requested; each requested one checked against its input (grads[0], the
// gradient of x, is activation-sized: its layout is picked with grad_out's); vector_slot[i]: in the acc dtype
Needs check_grads(const char* op, at::TensorList grads, const at::Tensor* const* inputs, const char* const* names,
                  const bool* vector_slot, size_t count, const at::Tensor& x, bool* need) {
  TORCH_CHECK(grads.size() == count, op, ": expected ", count, " tensors in grads, got ", grads.size());
  const at::ScalarType dt = x.scalar_type(), acc = acc_type(dt);
  for (size_t i = 0; i < count; ++i) {
    need[i] = grad_requested(grads[i]);
    if (!need[i]) continue;
    TORCH_CHECK(inputs[i] != nullptr, op, ": expected ", names[i], " empty (there is no gate), got shape ",
                grads[i].sizes());
    if (i == 0) {
      check_output(grads[i], x, op, names[i], x.sizes());
    } else {
      check_param(grads[i], x, vector_slot[i] ? acc : dt, op, names[i], inputs[i]->sizes());
    }
  }
  Needs nd;
  bool* fields[8] = {&nd.x, &nd.w1, &nd.s1, &nd.b1, &nd.w2, &nd.s2, &nd.b2, &nd.gate};
  for (size_t i = 0; i < count; ++i) *fields[i] = need[i];
  return nd;
}

void ghost_module_forward_cpu(const at::Tensor& x, const at::Tensor& primary_weight,
                              const std::optional<at::Tensor>& bn1_weight, const std::optional<at::Tensor>& bn1_bias,
                              const std::optional<at::Tensor>& bn1_mean, const std::optional<at::Tensor>& bn1_var,
                              double bn1_eps, const at::Tensor& cheap_weight,
                              const std::optional<at::Tensor>& bn2_weight, const std::optional<at::Tensor>& bn2_bias,
                              const std::optional<at::Tensor>& bn2_mean, const std::optional<at::Tensor>& bn2_var,
                              double bn2_eps, int64_t out_channels, int64_t act, const std::optional<at::Tensor>& gate,
                              c10::string_view gate_mode, const at::Tensor& out) {
  Geometry g = check_module_args(kFwdOp, x, primary_weight, cheap_weight, out_channels, act, gate, gate_mode);
  const BatchNormArgs bn1 =
      batch_norm_args(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, g.init, x, kFwdOp, "bn1");
  const BatchNormArgs bn2 =
      batch_norm_args(bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps, g.init * g.rm1, x, kFwdOp, "bn2");
  check_output(out, x, kFwdOp, "out", {g.N, g.oc, g.H, g.W});
  g.cl = pick_channels_last(kFwdOp, x, {{"out", out}});
  if (g.N == 0 || g.HW == 0) return;
  cpu::ghost_module::forward(g, x, primary_weight, bn1, cheap_weight, bn2, gate, out);
}

void backward_checked(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                      const at::Tensor& primary_weight, const at::Tensor& primary_scale,
                      const at::Tensor& primary_bias, const at::Tensor& cheap_weight, const at::Tensor& cheap_scale,
                      const at::Tensor& cheap_bias, int64_t out_channels, int64_t act,
                      const std::optional<at::Tensor>& gate, c10::string_view gate_mode, at::TensorList grads,
                      const at::Tensor* coef_a, const at::Tensor* coef_c, const at::Tensor* mean,
                      bool z1_in = false) {
  Geometry g = check_module_args(op, x, primary_weight, cheap_weight, out_channels, act, gate, gate_mode, z1_in);
  if (z1_in) {
    TORCH_CHECK(g.oc >= g.init, op, ": expected out_channels >= ", g.init, " (z1's channels: every one is kept), ",
                "got ", g.oc);
    TORCH_CHECK(grads.size() != 8 || !grad_requested(grads[1]), op, ": there is no primary weight (z1 is the ",
                "input, its gradient grads[0]); expected grads[1] empty, got shape ", grads[1].sizes());
  }
  StatsGradient sg;
  if (coef_a != nullptr) {
    const at::ScalarType acc = acc_type(x.scalar_type());
    check_param(*coef_a, x, acc, op, "coef_a", {g.init * g.rm1});
    check_param(*coef_c, x, acc, op, "coef_c", {g.init * g.rm1});
    check_param(*mean, x, acc, op, "mean", {g.init * g.rm1});
    sg.stage = 3;
    sg.coef_a = coef_a;
    sg.coef_c = coef_c;
    sg.mean = mean;
  }
  const at::ScalarType acc = acc_type(x.scalar_type());
  check_param(primary_scale, x, acc, op, "primary_scale", {g.init});
  check_param(primary_bias, x, acc, op, "primary_bias", {g.init});
  check_param(cheap_scale, x, acc, op, "cheap_scale", {g.init * g.rm1});
  check_param(cheap_bias, x, acc, op, "cheap_bias", {g.init * g.rm1});
  check_output(grad_out, x, op, "grad_out", {g.N, g.oc, g.H, g.W});
  static const char* const names[8] = {
      z1_in ? "grads[0] (z1)" : "grads[0] (x)", "grads[1] (primary_weight)", "grads[2] (primary_scale)", "grads[3] (primary_bias)",
      "grads[4] (cheap_weight)", "grads[5] (cheap_scale)",   "grads[6] (cheap_bias)",    "grads[7] (gate)"};
  static const bool vector_slot[8] = {false, false, true, true, false, true, true, false};
  const at::Tensor* inputs[8] = {&x, &primary_weight, &primary_scale, &primary_bias,
                                 &cheap_weight, &cheap_scale, &cheap_bias, g.gated ? &*gate : nullptr};
  bool need[8];
  const Needs nd = check_grads(op, grads, inputs, names, vector_slot, 8, x, need);
  std::vector<std::pair<const char*, at::Tensor>> dense;  // empty tensors have no layout to check
  if (grad_out.numel() > 0) dense.emplace_back("grad_out", grad_out);
  if (nd.x) dense.emplace_back(names[0], grads[0]);
  g.cl = pick_channels_last(op, x, dense);
  if (g.N == 0 || g.HW == 0) {
    for (int i = 1; i < 8; ++i)
      if (need[i]) grads[i].zero_();
    return;
  }
  cpu::ghost_module::backward(g, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                              cheap_bias, gate, grads, nd, sg);
}

void ghost_module_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& primary_weight,
                               const at::Tensor& primary_scale, const at::Tensor& primary_bias,
                               const at::Tensor& cheap_weight, const at::Tensor& cheap_scale,
                               const at::Tensor& cheap_bias, int64_t out_channels, int64_t act,
                               const std::optional<at::Tensor>& gate, c10::string_view gate_mode,
                               at::TensorList grads) {
  backward_checked(kBwdOp, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                   cheap_bias, out_channels, act, gate, gate_mode, grads, nullptr, nullptr, nullptr);
}

void ghost_module_backward_bnstats_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& primary_weight, const at::Tensor& primary_scale,
                                       const at::Tensor& primary_bias, const at::Tensor& cheap_weight,
                                       const at::Tensor& cheap_scale, const at::Tensor& cheap_bias,
                                       int64_t out_channels, int64_t act, const std::optional<at::Tensor>& gate,
                                       c10::string_view gate_mode, const at::Tensor& coef_a,
                                       const at::Tensor& coef_c, const at::Tensor& mean, at::TensorList grads) {
  backward_checked(kBnStatsBwdOp, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                   cheap_scale, cheap_bias, out_channels, act, gate, gate_mode, grads, &coef_a, &coef_c, &mean);
}

// z1 given (the primary conv computed by the caller), bn2 on batch statistics: z2's mean and biased variance over
// every cheap channel (into mean / var), then the module normalised with them into out
void ghost_module_z1_cpu(const at::Tensor& z1, const std::optional<at::Tensor>& bn1_weight,
                         const std::optional<at::Tensor>& bn1_bias, const std::optional<at::Tensor>& bn1_mean,
                         const std::optional<at::Tensor>& bn1_var, double bn1_eps, const at::Tensor& cheap_weight,
                         const std::optional<at::Tensor>& bn2_weight, const std::optional<at::Tensor>& bn2_bias,
                         double bn2_eps, int64_t out_channels, int64_t act, const std::optional<at::Tensor>& gate,
                         c10::string_view gate_mode, const at::Tensor& out, const at::Tensor& mean,
                         const at::Tensor& var) {
  Geometry g = check_module_args(kZ1Op, z1, at::Tensor(), cheap_weight, out_channels, act, gate, gate_mode, true);
  TORCH_CHECK(g.oc >= g.init, kZ1Op, ": expected out_channels >= ", g.init, " (z1's channels: every one is kept), ",
              "got ", g.oc);
  const int64_t cheap = g.init * g.rm1;
  const BatchNormArgs bn1 =
      batch_norm_args(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, g.init, z1, kZ1Op, "bn1");
  check_param(mean, z1, z1.scalar_type(), kZ1Op, "mean", {cheap});
  check_param(var, z1, z1.scalar_type(), kZ1Op, "var", {cheap});
  check_output(out, z1, kZ1Op, "out", {g.N, g.oc, g.H, g.W});
  g.cl = pick_channels_last(kZ1Op, z1, {{"out", out}});
  if (g.N == 0 || g.HW == 0) {  // no values: NaN statistics, as torch.var_mean of an empty tensor
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  Geometry gs = g;  // the statistics: every cheap channel, no gate
  set_out_channels(gs, g.init + cheap);
  gs.gated = false;
  gs.bilinear = false;
  cpu::ghost_module::stats(gs, 2, z1, at::Tensor(), bn1, cheap_weight, mean, var);
  const BatchNormArgs bn2 = batch_norm_args(bn2_weight, bn2_bias, mean, var, bn2_eps, cheap, z1, kZ1Op, "bn2");
  cpu::ghost_module::forward(g, z1, at::Tensor(), bn1, cheap_weight, bn2, gate, out);
}

// bn1's batch statistics from z1: its channels' mean and biased variance
void ghost_module_z1_stats_cpu(const at::Tensor& z1, const at::Tensor& mean, const at::Tensor& var) {
  check_x(z1, c10::DeviceType::CPU, kZ1StatsOp);
  const at::ScalarType dt = z1.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, kZ1StatsOp, ": expected z1 of dtype float32 or float64, got ",
              dt);
  check_param(mean, z1, dt, kZ1StatsOp, "mean", {z1.size(1)});
  check_param(var, z1, dt, kZ1StatsOp, "var", {z1.size(1)});
  if (z1.numel() == 0) {  // no values: NaN, as torch.var_mean of an empty tensor
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  cpu::ghost_module::z1_stats(z1, is_channels_last(z1), mean, var);
}

// its backward: _ghost_module_backward_bnstats_kernel's with z1 as the input, grads[0] = dz1 (grads[1] empty)
void ghost_module_z1_backward_cpu(const at::Tensor& grad_out, const at::Tensor& z1, const at::Tensor& primary_scale,
                                  const at::Tensor& primary_bias, const at::Tensor& cheap_weight,
                                  const at::Tensor& cheap_scale, const at::Tensor& cheap_bias, int64_t out_channels,
                                  int64_t act, const std::optional<at::Tensor>& gate, c10::string_view gate_mode,
                                  const at::Tensor& coef_a, const at::Tensor& coef_c, const at::Tensor& mean,
                                  at::TensorList grads) {
  backward_checked(kZ1BwdOp, grad_out, z1, at::Tensor(), primary_scale, primary_bias, cheap_weight, cheap_scale,
                   cheap_bias, out_channels, act, gate, gate_mode, grads, &coef_a, &coef_c, &mean, true);
}

void ghost_module_stats_cpu(const at::Tensor& x, const at::Tensor& primary_weight,
                            const std::optional<at::Tensor>& bn1_weight, const std::optional<at::Tensor>& bn1_bias,
                            const std::optional<at::Tensor>& bn1_mean, const std::optional<at::Tensor>& bn1_var,
                            double bn1_eps, const at::Tensor& cheap_weight, int64_t act, int64_t stage,
                            const at::Tensor& mean, const at::Tensor& var) {
  Geometry g = check_stats_args(kStatsOp, x, primary_weight, cheap_weight, act, stage);
  const BatchNormArgs bn1 =
      batch_norm_args(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, g.init, x, kStatsOp, "bn1");
  const at::ScalarType acc = acc_type(x.scalar_type());
  const int64_t channels = stage == 1 ? g.n_x1 : g.n_cheap;
  check_param(mean, x, acc, kStatsOp, "mean", {channels});
  check_param(var, x, acc, kStatsOp, "var", {channels});
  g.cl = is_channels_last(x);
  if (g.N == 0 || g.HW == 0) {  // no values: NaN, as torch.var_mean of an empty tensor
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  cpu::ghost_module::stats(g, static_cast<int>(stage), x, primary_weight, bn1, cheap_weight, mean, var);
}

void ghost_module_stats_backward_cpu(const at::Tensor& x, const at::Tensor& primary_weight,
                                     const at::Tensor& primary_scale, const at::Tensor& primary_bias,
                                     const at::Tensor& cheap_weight, int64_t act, int64_t stage,
                                     const at::Tensor& coef_a, const at::Tensor& coef_c, const at::Tensor& mean,
                                     at::TensorList grads) {
  Geometry g = check_stats_args(kStatsBwdOp, x, primary_weight, cheap_weight, act, stage);
  const at::ScalarType acc = acc_type(x.scalar_type());
  check_param(primary_scale, x, acc, kStatsBwdOp, "primary_scale", {g.init});
  check_param(primary_bias, x, acc, kStatsBwdOp, "primary_bias", {g.init});
  const int64_t channels = stage == 1 ? g.n_x1 : g.n_cheap;
  check_param(coef_a, x, acc, kStatsBwdOp, "coef_a", {channels});
  check_param(coef_c, x, acc, kStatsBwdOp, "coef_c", {channels});
  check_param(mean, x, acc, kStatsBwdOp, "mean", {channels});
  static const char* const names[5] = {"grads[0] (x)", "grads[1] (primary_weight)", "grads[2] (primary_scale)",
                                       "grads[3] (primary_bias)", "grads[4] (cheap_weight)"};
  static const bool vector_slot[5] = {false, false, true, true, false};
  const at::Tensor* inputs[5] = {&x, &primary_weight, &primary_scale, &primary_bias, &cheap_weight};
  for (size_t i = 2; i < grads.size() && i < 5 && stage == 1; ++i) {
    TORCH_CHECK(!grad_requested(grads[i]), kStatsBwdOp, ": stage 1 (z1 = conv1x1(x)) depends on x and ",
                "primary_weight only; expected ", names[i], " empty, got shape ", grads[i].sizes());
  }
  bool need[5];
  const Needs nd = check_grads(kStatsBwdOp, grads, inputs, names, vector_slot, 5, x, need);
  std::vector<std::pair<const char*, at::Tensor>> dense;
  if (nd.x) dense.emplace_back(names[0], grads[0]);
  g.cl = pick_channels_last(kStatsBwdOp, x, dense);
  if (g.N == 0 || g.HW == 0) {
    for (int i = 0; i < 5; ++i)
      if (need[i]) grads[i].zero_();
    return;
  }
  if (!(nd.primary() || nd.w2)) return;
  StatsGradient sg;
  sg.stage = static_cast<int>(stage);
  sg.coef_a = &coef_a;
  sg.coef_c = &coef_c;
  sg.mean = &mean;
  cpu::ghost_module::backward(g, at::Tensor(), x, primary_weight, primary_scale, primary_bias, cheap_weight,
                              at::Tensor(), at::Tensor(), std::nullopt, grads, nd, sg);
}

}  // namespace
}  // namespace ghostfast

static_assert(std::is_same_v<decltype(ghostfast::ghost_module_forward_cpu), ghostfast::GhostModuleKernel>,
              "ghost_module_forward_cpu: C++ signature differs from kernel_signatures.h");
static_assert(std::is_same_v<decltype(ghostfast::ghost_module_backward_cpu), ghostfast::GhostModuleBackwardKernel>,
              "ghost_module_backward_cpu: C++ signature differs from kernel_signatures.h");
static_assert(std::is_same_v<decltype(ghostfast::ghost_module_stats_cpu), ghostfast::GhostModuleStatsKernel>,
              "ghost_module_stats_cpu: C++ signature differs from kernel_signatures.h");
static_assert(std::is_same_v<decltype(ghostfast::ghost_module_stats_backward_cpu),
                             ghostfast::GhostModuleStatsBackwardKernel>,
              "ghost_module_stats_backward_cpu: C++ signature differs from kernel_signatures.h");

TORCH_LIBRARY_IMPL(ghostfast, CPU, m) {
  m.impl("_ghost_module_kernel", &ghostfast::ghost_module_forward_cpu);
  m.impl("_ghost_module_backward_kernel", &ghostfast::ghost_module_backward_cpu);
  m.impl("_ghost_module_backward_bnstats_kernel", &ghostfast::ghost_module_backward_bnstats_cpu);
  m.impl("_ghost_module_stats_kernel", &ghostfast::ghost_module_stats_cpu);
  m.impl("_ghost_module_stats_backward_kernel", &ghostfast::ghost_module_stats_backward_cpu);
  m.impl("_ghost_module_z1_kernel", &ghostfast::ghost_module_z1_cpu);
  m.impl("_ghost_module_z1_backward_kernel", &ghostfast::ghost_module_z1_backward_cpu);
  m.impl("_ghost_module_z1_stats_kernel", &ghostfast::ghost_module_z1_stats_cpu);
}
