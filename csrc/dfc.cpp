// Schema of the fused DFC attention kernels. The public op `ghostfast::dfc` (ghostfast/ops.py; the Python
// functions dfc_gate and dfc_attention) calls these for the `cpu` and `cuda` backends. CPU: cpu/dfc.cpp (checks,
// registration), cpu/dfc_forward.cpp, cpu/dfc_backward.cpp, on cpu/vec.h and gemm.h. CUDA: cuda/dfc.cu (checks,
// forward, registration), cuda/dfc_backward.cu, on cuda/common.cuh, gemm.cuh, upsample.cuh.
//
// mode: 'gate' -> out is the gate at the pooled resolution [N, C, H/2, W/2];
//       'nearest' | 'bilinear' -> out is the gate upsampled to x's [N, C, H, W] as F.interpolate does.
// Conventions (checked by the implementations, arranged by ghostfast/ops.py):
//  - x is contiguous in NCHW or in channels_last; `out`, `grad` and grad_x have x's memory format.
//  - conv_weight [C, C_in, 1, 1], h_weight [C, 1, 1, 5], v_weight [C, 1, 5, 1]: contiguous, x's dtype.
//  - the forward kernel takes each BatchNorm as live tensors (bn3: after the 1x1 conv, bn4: after the 1x5, bn5: after
//    the 5x1; optional weight, bias, mean, var vectors and eps) and folds them per channel inside the launch
//    (batch_norm.h); the backward kernel takes the folded scales and biases (conv_scale, conv_bias, h_scale, ...)
//    as contiguous vectors in the accumulation dtype (float32; float64 for float64 inputs).
//  - the kernels write every element of `out` and of every non-empty tensor in `grads` (order: x, conv_weight,
//    conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias); an empty tensor marks a
//    gradient that is not needed.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ghostfast, m) {
  m.def(
      "_dfc_kernel(Tensor x, Tensor conv_weight, Tensor? bn3_weight, Tensor? bn3_bias, Tensor? bn3_mean, Tensor? bn3_var, float bn3_eps, "
      "Tensor h_weight, Tensor? bn4_weight, Tensor? bn4_bias, Tensor? bn4_mean, Tensor? bn4_var, float bn4_eps, "
      "Tensor v_weight, Tensor? bn5_weight, Tensor? bn5_bias, Tensor? bn5_mean, Tensor? bn5_var, float bn5_eps, str mode, Tensor(a!) out) -> ()");
  m.def(
      "_dfc_backward_kernel(Tensor grad, Tensor x, Tensor conv_weight, Tensor conv_scale, Tensor conv_bias, "
      "Tensor h_weight, Tensor h_scale, Tensor h_bias, Tensor v_weight, Tensor v_scale, Tensor v_bias, str mode, "
      "Tensor(a!)[] grads) -> ()");
}
