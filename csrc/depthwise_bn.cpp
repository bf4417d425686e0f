// Schema of the depthwise conv + BatchNorm kernel: the stride-s depthwise convs of a GhostNet bottleneck
// (conv_dw -> bn_dw, and the shortcut's depthwise conv -> BatchNorm), BatchNorm folded per channel inside the
// launch (batch_norm.h). Called by ghostfast.nn.GhostBottleneck's direct path (inference; ghostfast/bottleneck.py),
// reference: ghostfast.reference.depthwise_bn_forward. CPU: cpu/depthwise_bn.cpp.
//
//   out[n, c, i, j] = scale[c] * sum_{ky, kx} weight[c, 0, ky, kx] * x[n, c, i*stride - padding + ky,
//                                                                   j*stride - padding + kx] + shift[c]
// with zero padding, scale / shift folded from the optional bn vectors as in the Ghost module kernels (a conv
// bias is `bn_bias` alone). x [N, C, H, W] contiguous in NCHW or channels_last, float32 or float64; weight
// [C, 1, K, K] contiguous, x's dtype; out [N, C, (H + 2p - K) / s + 1, (W + 2p - K) / s + 1] in x's memory format,
// every element written.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ghostfast, m) {
  m.def(
      "_depthwise_bn_kernel(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor? bn_mean, "
      "Tensor? bn_var, float bn_eps, int stride, int padding, Tensor(a!) out) -> ()");
}
