// The C++ signatures of the compiled kernels, one per schema in ghost_module.cpp / dfc.cpp / depthwise_bn.cpp. The
// dispatcher requires every backend's kernel of an op to have the same C++ signature (a mismatch aborts the process
// when ghostfast._C is imported), so each implementation file static_asserts its functions against these.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace ghostfast {

using GhostModuleKernel = void(const at::Tensor& x, const at::Tensor& primary_weight,
                               const std::optional<at::Tensor>& bn1_weight, const std::optional<at::Tensor>& bn1_bias,
                               const std::optional<at::Tensor>& bn1_mean, const std::optional<at::Tensor>& bn1_var,
                               double bn1_eps, const at::Tensor& cheap_weight,
                               const std::optional<at::Tensor>& bn2_weight, const std::optional<at::Tensor>& bn2_bias,
                               const std::optional<at::Tensor>& bn2_mean, const std::optional<at::Tensor>& bn2_var,
                               double bn2_eps, int64_t out_channels,
                               int64_t act, const std::optional<at::Tensor>& gate, c10::string_view gate_mode,
                               const at::Tensor& out);

using GhostModuleBackwardKernel = void(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& primary_weight, const at::Tensor& primary_scale,
                                       const at::Tensor& primary_bias, const at::Tensor& cheap_weight,
                                       const at::Tensor& cheap_scale, const at::Tensor& cheap_bias,
                                       int64_t out_channels, int64_t act, const std::optional<at::Tensor>& gate,
                                       c10::string_view gate_mode, at::TensorList grads);

using GhostModuleStatsKernel = void(const at::Tensor& x, const at::Tensor& primary_weight,
                               const std::optional<at::Tensor>& bn1_weight, const std::optional<at::Tensor>& bn1_bias,
                               const std::optional<at::Tensor>& bn1_mean, const std::optional<at::Tensor>& bn1_var,
                               double bn1_eps,
                                    const at::Tensor& cheap_weight, int64_t act, int64_t stage, const at::Tensor& mean,
                                    const at::Tensor& var);

using GhostModuleStatsBackwardKernel = void(const at::Tensor& x, const at::Tensor& primary_weight,
                                            const at::Tensor& primary_scale, const at::Tensor& primary_bias,
                                            const at::Tensor& cheap_weight, int64_t act, int64_t stage,
                                            const at::Tensor& coef_a, const at::Tensor& coef_c,
                                            const at::Tensor& mean, at::TensorList grads);

using DfcKernel = void(const at::Tensor& x, const at::Tensor& conv_weight,
                               const std::optional<at::Tensor>& bn3_weight, const std::optional<at::Tensor>& bn3_bias,
                               const std::optional<at::Tensor>& bn3_mean, const std::optional<at::Tensor>& bn3_var,
                               double bn3_eps, const at::Tensor& h_weight,
                               const std::optional<at::Tensor>& bn4_weight, const std::optional<at::Tensor>& bn4_bias,
                               const std::optional<at::Tensor>& bn4_mean, const std::optional<at::Tensor>& bn4_var,
                               double bn4_eps, const at::Tensor& v_weight,
                               const std::optional<at::Tensor>& bn5_weight, const std::optional<at::Tensor>& bn5_bias,
                               const std::optional<at::Tensor>& bn5_mean, const std::optional<at::Tensor>& bn5_var,
                               double bn5_eps, c10::string_view mode, const at::Tensor& out);

using DfcBackwardKernel = void(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& conv_weight,
                               const at::Tensor& conv_scale, const at::Tensor& conv_bias, const at::Tensor& h_weight,
                               const at::Tensor& h_scale, const at::Tensor& h_bias, const at::Tensor& v_weight,
                               const at::Tensor& v_scale, const at::Tensor& v_bias, c10::string_view mode,
                               at::TensorList grads);

using DepthwiseBnKernel = void(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                               const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
                               double bn_eps, int64_t stride, int64_t padding, const at::Tensor& out);

}  // namespace ghostfast
