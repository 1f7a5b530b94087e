// The multi-tensor AdamS step of the generic path: a fixed number of ATen `_foreach_*` calls
// per (device, dtype) group, whatever the number of parameters, as torch.optim.AdamW
// (foreach=True) does. This is the path every CUDA tensor takes until a fused CUDA kernel
// exists (on CUDA each `_foreach_*` call is one multi-tensor kernel launch), and the path of
// any CPU tensor the slice kernels do not take (fp64, non-contiguous).
//
// Rust (src/generic.rs) calls it through the C ABI below, after it has refreshed the masks
// that are due (per tensor, every `mask_interval` steps) and made sure every sparse tensor has
// its `drop` tensor: 1 where the current mask removes the weight, 0 where it keeps it, in the
// parameter's dtype. The packed 1-bit mask stays the state of record; `drop` is a cache that
// saves unpacking it at every step (a CUDA-friendly trade of one parameter-sized buffer per
// sparse tensor, until a fused kernel reads the bits directly).
//
// Per step, for the whole group (k tensors, some of them sparse):
//
//   P  ← P · (1 − lr·wd)                       _foreach_mul_        (only if some wd ≠ 0)
//   μ  ← lerp(μ, g, 1 − β1)                    _foreach_lerp_
//   μ̃  ← μ − α·drop·μ + αλ·drop·sign(θ)        _foreach_sign, _foreach_addcmul, _foreach_addcmul_
//                                              (sparse: μ where kept, (1−α)μ + αλ·sign(θ) where masked)
//   v  ← β2·v + (1 − β2)·x²                    _foreach_mul_, _foreach_addcmul_   (x = μ̃ sparse, g dense)
//   d  ← sqrt(v) + ε/c                         _foreach_sqrt, _foreach_add_   (c = 1/sqrt(1 − β2^s))
//   θ  ← θ − (step_size/c) · y / d             _foreach_addcdiv_    (y = μ̃ sparse, μ dense)
//
// 9 calls without weight decay, 10 with it (torch's AdamW foreach: 7 or 8, and per-tensor
// step bookkeeping). In memory traffic a sparse tensor costs about 25 passes over its size
// (μ̃ takes a sign, two fused multiply-adds and the drop tensor) against AdamW's 18: on a
// memory-bound device that, not the call count, sets the cost. The per-tensor values (λ, α, the bias corrections, the decay factor) are scalar
// lists: tensors of one group may have taken different numbers of steps. No call reads a value
// back to the host, so on CUDA the step never synchronises.
//
// Non-finite values: the blend is arithmetic (there is no `_foreach_where`), so an infinite μ
// gives NaN in μ̃ where the fast path's per-element select keeps ±inf; the elements that end
// non-finite are the same.

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

namespace {
void write_message(const char* text, char* message, size_t message_len) {
  if (message == nullptr || message_len == 0) return;
  std::strncpy(message, text, message_len - 1);
  message[message_len - 1] = '\0';
}
}  // namespace

extern "C" {
// Mirrors ForeachScalars in src/generic.rs.
struct CastForeachScalars {
  double decay;         // 1 − lr·wd
  double l1;            // λ (sparse tensors)
  double alpha;         // α = min(1, s / T) (sparse tensors)
  double step_size;     // lr / (1 − β1^s)
  double inv_bc2_sqrt;  // 1 / sqrt(1 − β2^s)
};

// Returns 0, or 3 with a NUL-terminated message in `message` (at most `message_len` bytes).
int32_t cast_rs_adams_foreach(size_t k, const at::Tensor* const* params, const at::Tensor* const* grads,
                              const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                              const at::Tensor* const* drops, const CastForeachScalars* scalars, double beta1,
                              double beta2, double eps, char* message, size_t message_len) {
  try {
    std::vector<at::Tensor> p, g, mu, v;
    std::vector<at::Tensor> sp, smu, sdrop;  // the sparse subset
    std::vector<size_t> sparse_at;           // its positions in the group
    std::vector<at::Scalar> decay, neg_alpha, alpha_l1, neg_step_over_c, eps_over_c;
    bool any_decay = false;
    for (size_t i = 0; i < k; ++i) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      mu.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      const CastForeachScalars& s = scalars[i];
      decay.emplace_back(s.decay);
      any_decay = any_decay || s.decay != 1.0;
      neg_step_over_c.emplace_back(-s.step_size / s.inv_bc2_sqrt);
      eps_over_c.emplace_back(eps / s.inv_bc2_sqrt);
      if (drops[i] != nullptr) {
        sp.push_back(*params[i]);
        smu.push_back(*exp_avgs[i]);
        sdrop.push_back(*drops[i]);
        sparse_at.push_back(i);
        neg_alpha.emplace_back(-s.alpha);
        alpha_l1.emplace_back(s.alpha * s.l1);
      }
    }
    if (any_decay) at::_foreach_mul_(p, decay);
    at::_foreach_lerp_(mu, g, 1.0 - beta1);
    // What the second moment squares and what the step divides: μ̃ for a sparse tensor; g and
    // μ for a dense one, as Adam.
    std::vector<at::Tensor> sq = g, num = mu;
    if (!sp.empty()) {
      // μ̃ = μ − α·drop·μ + αλ·drop·sign(θ): two fused multiply-adds in the op's f32
      // arithmetic. Where kept (drop = 0) this is μ exactly; where masked it is (1 − α)·μ +
      // αλ·sign(θ), and exactly λ·sign(θ) once α = 1 (α·μ·1 == μ). Not μ + α·drop·(λ·sign(θ)
      // − μ): at α = 1 that cancels |μ| against itself and leaves an error of a rounding of
      // |μ| (in bf16, 2^-9·|μ|) in place of a λ that may be far smaller than |μ|.
      std::vector<at::Tensor> sign = at::_foreach_sign(sp);
      std::vector<at::Tensor> mt = at::_foreach_addcmul(smu, smu, sdrop, neg_alpha);
      at::_foreach_addcmul_(mt, sign, sdrop, alpha_l1);
      for (size_t j = 0; j < sparse_at.size(); ++j) {
        sq[sparse_at[j]] = mt[j];
        num[sparse_at[j]] = mt[j];
      }
    }
    at::_foreach_mul_(v, beta2);
    at::_foreach_addcmul_(v, sq, sq, 1.0 - beta2);
    // θ − step_size·y / (sqrt(v)·c + ε) = θ − (step_size/c)·y / (sqrt(v) + ε/c), c =
    // 1/sqrt(1 − β2^s): the bias correction moves into two per-tensor scalars, which saves
    // a pass over every tensor (a few roundings from the fast path's order, no more).
    std::vector<at::Tensor> denom = at::_foreach_sqrt(v);
    at::_foreach_add_(denom, eps_over_c);
    at::_foreach_addcdiv_(p, num, denom, neg_step_over_c);
    return 0;
  } catch (const c10::Error& e) {
    write_message(e.what_without_backtrace(), message, message_len);
    return 3;
  } catch (const std::exception& e) {
    write_message(e.what(), message, message_len);
    return 3;
  }
}
}
