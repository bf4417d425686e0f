// Schema of the fused Ghost module kernels. The public op `ghostfast::ghost_module` (ghostfast/ops.py: fake
// kernel, autograd, backend choice) calls these for the `cpu` and `cuda` backends. CPU: cpu/ghost_module.cpp
// (checks, registration), cpu/ghost_module_forward.cpp, _backward.cpp, _stats.cpp, on the shared layer cpu/vec.h,
// gemm.h, depthwise.h, gate_upsample.h. CUDA: cuda/ghost_module.cu (checks, forward, registration),
// cuda/ghost_module_backward.cu, on cuda/common.cuh, gemm.cuh, upsample.cuh. BatchNorm folding: batch_norm.h.
//
// Conventions (checked by the implementations, arranged by ghostfast/ops.py):
//  - x is contiguous in NCHW or in channels_last; `out` and grad_x have x's memory format.
//  - primary_weight [init, C_in, 1, 1] and cheap_weight [init*(ratio-1), 1, k, k] are contiguous, x's dtype.
//  - forward and statistics kernels take each BatchNorm as live tensors (bn1: after the primary conv, bn2: after the
//    cheap depthwise; optional weight, bias, mean, var vectors and eps) and fold them per channel inside the launch
//    (batch_norm.h); the backward kernels take the folded scales and biases as contiguous vectors in the
//    accumulation dtype (float32; float64 for float64 inputs), computed by the op's autograd.
//  - act: both halves' activation as its code in ghostfast.reference.ACT_CODES (0 none, 1 relu, 2 relu6,
//    3 hardswish, 4 silu; F.relu, F.relu6, F.hardswish, F.silu as eager PyTorch computes them, their backward from
//    the pre-activation); other codes are an error.
//  - gate, when given, is [N, out_channels, Hg, Wg], contiguous NCHW, x's dtype; gate_mode 'nearest'|'bilinear'.
//  - the kernels write every element of `out` and of every non-empty tensor in `grads`
//    (order: x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate);
//    an empty tensor in `grads` marks a gradient that is not needed.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ghostfast, m) {
  m.def(
      "_ghost_module_kernel(Tensor x, Tensor primary_weight, "
      "Tensor? bn1_weight, Tensor? bn1_bias, Tensor? bn1_mean, Tensor? bn1_var, float bn1_eps, Tensor cheap_weight, "
      "Tensor? bn2_weight, Tensor? bn2_bias, Tensor? bn2_mean, Tensor? bn2_var, float bn2_eps, "
      "int out_channels, int act, Tensor? gate, str gate_mode, Tensor(a!) out) -> ()");
  m.def(
      "_ghost_module_backward_kernel(Tensor grad_out, Tensor x, Tensor primary_weight, Tensor primary_scale, "
      "Tensor primary_bias, Tensor cheap_weight, Tensor cheap_scale, Tensor cheap_bias, int out_channels, "
      "int act, Tensor? gate, str gate_mode, Tensor(a!)[] grads) -> ()");
  // Training-mode BatchNorm statistics (ghostfast.reference.ghost_module_stats): per channel over N, H, W, the
  // mean and biased variance of z1 = W1 x (stage 1, [init]; bn1 unused) or of z2 = dw(act(bn1(z1))) (stage 2,
  // every cheap channel). mean and var are accumulation-dtype vectors.
  m.def(
      "_ghost_module_stats_kernel(Tensor x, Tensor primary_weight, "
      "Tensor? bn1_weight, Tensor? bn1_bias, Tensor? bn1_mean, Tensor? bn1_var, float bn1_eps, "
      "Tensor cheap_weight, int act, int stage, Tensor(a!) mean, Tensor(b!) var) -> ()");
  // Its backward: with dz = coef_a + coef_c * (z - mean) per channel of the stage's z, the gradients of
  // sum(dz * z) (grads order: x, primary_weight, primary_scale, primary_bias, cheap_weight; stage 1 fills at most
  // the first two; empty = not needed).
  m.def(
      "_ghost_module_stats_backward_kernel(Tensor x, Tensor primary_weight, Tensor primary_scale, "
      "Tensor primary_bias, Tensor cheap_weight, int act, int stage, Tensor coef_a, Tensor coef_c, Tensor mean, "
      "Tensor(a!)[] grads) -> ()");
  // The backward of the fused op whose bn2 normalises with the batch statistics of z2 (CPU only): the gradients of
  // _ghost_module_backward_kernel with the statistics' gradient dz2 += coef_a + coef_c * (z2 - mean) added per
  // cheap channel, so the stage-2 statistics need no backward pass of their own (grads as there; the cheap
  // scale's and bias's slots are the main path's, the coefficients come from them).
  m.def(
      "_ghost_module_backward_bnstats_kernel(Tensor grad_out, Tensor x, Tensor primary_weight, Tensor primary_scale, "
      "Tensor primary_bias, Tensor cheap_weight, Tensor cheap_scale, Tensor cheap_bias, int out_channels, "
      "int act, Tensor? gate, str gate_mode, Tensor coef_a, Tensor coef_c, Tensor mean, Tensor(a!)[] grads) -> ()");
  // Training with z1 = W1 x computed (and kept) by the caller (CPU only, float32 / float64): the module from z1
  // [N, init, H, W] itself, no primary weight, out_channels >= init, bn2 normalising with the batch statistics of
  // z2 (mean and biased var over every cheap channel, written to `mean` / `var`, z1's dtype); and its backward,
  // as _ghost_module_backward_bnstats_kernel's with grads[0] the gradient of z1 (grads[1] empty).
  m.def(
      "_ghost_module_z1_kernel(Tensor z1, Tensor? bn1_weight, Tensor? bn1_bias, Tensor? bn1_mean, Tensor? bn1_var, "
      "float bn1_eps, Tensor cheap_weight, Tensor? bn2_weight, Tensor? bn2_bias, float bn2_eps, int out_channels, "
      "int act, Tensor? gate, str gate_mode, Tensor(a!) out, Tensor(b!) mean, Tensor(c!) var) -> ()");
  m.def(
      "_ghost_module_z1_backward_kernel(Tensor grad_out, Tensor z1, Tensor primary_scale, Tensor primary_bias, "
      "Tensor cheap_weight, Tensor cheap_scale, Tensor cheap_bias, int out_channels, int act, Tensor? gate, "
      "str gate_mode, Tensor coef_a, Tensor coef_c, Tensor mean, Tensor(a!)[] grads) -> ()");
  // bn1's batch statistics from z1: per channel, the mean and biased variance (z1's dtype)
  m.def("_ghost_module_z1_stats_kernel(Tensor z1, Tensor(a!) mean, Tensor(b!) var) -> ()");
}
