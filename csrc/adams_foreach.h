// The multi-tensor AdamS step of the generic path (adams_foreach.cpp), called by the
// adams_step_ operator (cast_rs_ops.cpp) for the tensors the Rust side left to it.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

extern "C" {
// Mirrors ForeachScalars in src/generic.rs (which fills it).
struct CastForeachScalars {
  double step;             // s, the step being taken (>= 1)
  double weight_decay;     // wd (the fused route)
  double decay;            // 1 − lr·wd (the foreach route)
  double l1;               // λ (sparse tensors)
  double alpha;            // α = min(1, s / T) (sparse tensors)
  double step_size;        // lr / (1 − β1^s)
  double inv_bc2_sqrt;     // 1 / sqrt(1 − β2^s)
  double masked_lr_scale;  // r: masked weights step r·lr (sparse tensors; 1 = the paper's AdamS)
};

// One (device, dtype) group of `k` tensors: `keeps[i]` is the keep tensor of a sparse tensor,
// null for a dense one. Returns 0, or 3 with a NUL-terminated message in `message`.
int32_t cast_rs_adams_foreach(size_t k, const at::Tensor* const* params, const at::Tensor* const* grads,
                              const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                              const at::Tensor* const* keeps, const CastForeachScalars* scalars, double lr,
                              double beta1, double beta2, double eps, char* message, size_t message_len);
}
