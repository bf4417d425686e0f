// The Ghost module's activations on the CPU (both halves: x1 = act(bn1(z1)), x2 = act(bn2(z2))), the one place the
// CPU kernels compute them: the forward act_v<A>(y) and the backward act_grad_v<A>(g, y) = g * act'(y), both on
// Vectorized<acc_t> and both of the pre-activation y (after the BatchNorm, before the activation), as eager PyTorch
// computes them (F.relu, F.relu6, F.hardswish, F.silu and their autograd backward):
//
//   relu       y < 0 ? 0 : y                          g where y > 0 (0 at y <= 0; NaN: g, threshold_backward)
//   relu6      y < 0 ? 0 : (y > 6 ? 6 : y)            0 where y <= 0 or y >= 6, else g (hardtanh_backward)
//   hardswish  y * min(max(y + 3, 0), 6) / 6          0 where y <= -3, g (y / 3 + 0.5) where y < 3, else g
//                                                     (hardswish_backward)
//   silu       y * sigmoid(y)                         g s (1 + y (1 - s)), s = sigmoid(y)
//
// The forwards let NaN through (comparisons are false for NaN, so no clamp catches it; hardswish(-inf) and
// silu(-inf) are NaN as in eager). The backward at a NaN y is g for relu, relu6 and hardswish (eager's scalar and
// CUDA paths; the vectorized CPU paths of hardtanh / hardswish_backward give 0 / NaN there) and NaN for silu.
//
// The activation is a template argument: each kernel dispatches it once per launch (dispatch_act), outside its
// loops.
#pragma once

#include <type_traits>

#include "common.h"
#include "cpu/vec.h"

namespace ghostfast::cpu {

template <Act A, typename acc_t>
inline Vectorized<acc_t> act_v(const Vectorized<acc_t>& y) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0));
  if constexpr (A == Act::None) {
    return y;
  } else if constexpr (A == Act::Relu) {
    return Vec::blendv(y, zero, y < zero);
  } else if constexpr (A == Act::Relu6) {
    const Vec six(acc_t(6));
    return Vec::blendv(Vec::blendv(y, zero, y < zero), six, y > six);
  } else if constexpr (A == Act::Hardswish) {
    const Vec six(acc_t(6));
    Vec t = y + Vec(acc_t(3));
    t = Vec::blendv(Vec::blendv(t, zero, t < zero), six, t > six);
    return y * t / six;
  } else {
    static_assert(A == Act::Silu, "unknown activation");
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) return y * vsigmoid(y);  // vec.h's inlined exp: within ~1 ulp
#endif
    return y / (Vec(acc_t(1)) + y.neg().exp());  // eager's expression (float64: the same bits)
  }
}

template <Act A, typename acc_t>
inline Vectorized<acc_t> act_grad_v(const Vectorized<acc_t>& g, const Vectorized<acc_t>& y) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0));
  if constexpr (A == Act::None) {
    return g;
  } else if constexpr (A == Act::Relu) {
    return Vec::blendv(g, zero, y <= zero);
  } else if constexpr (A == Act::Relu6) {
    const Vec six(acc_t(6));
    return Vec::blendv(g, zero, (y <= zero) | (y >= six));
  } else if constexpr (A == Act::Hardswish) {
    const Vec three(acc_t(3)), m3(acc_t(-3));
    const Vec mid = g * (y / three + Vec(acc_t(0.5)));
    return Vec::blendv(Vec::blendv(g, mid, (y > m3) & (y < three)), zero, y <= m3);
  } else {
    static_assert(A == Act::Silu, "unknown activation");
    const Vec one(acc_t(1));
    const Vec s = vsigmoid(y);
    return g * s * (one + y * (one - s));
  }
}

template <Act A>
using ActTag = std::integral_constant<Act, A>;

// f(ActTag<A>()) for the activation a: the one runtime switch of a launch
template <typename F>
inline void dispatch_act(Act a, const F& f) {
  switch (a) {
    case Act::None: f(ActTag<Act::None>()); break;
    case Act::Relu: f(ActTag<Act::Relu>()); break;
    case Act::Relu6: f(ActTag<Act::Relu6>()); break;
    case Act::Hardswish: f(ActTag<Act::Hardswish>()); break;
    case Act::Silu: f(ActTag<Act::Silu>()); break;
    default: TORCH_CHECK(false, "ghostfast: unknown activation code ", static_cast<int>(a));
  }
}

}  // namespace ghostfast::cpu
