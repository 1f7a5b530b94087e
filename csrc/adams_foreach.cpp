// The multi-tensor AdamS step of the generic path: a fixed number of ATen multi-tensor calls
// per (device, dtype) group, whatever the number of parameters, as torch.optim.AdamW
// (foreach=True / fused=True) does. This is the path every CUDA tensor takes until a fused
// CUDA kernel of our own exists (on CUDA each call below is one multi-tensor kernel launch),
// and the path of any CPU tensor the slice kernels do not take (fp64, non-contiguous).
//
// The adams_step_ operator (cast_rs_ops.cpp) calls it once the Rust side (src/generic.rs)
// has refreshed the masks that are due (per tensor, every `mask_interval` steps) and made sure every sparse tensor has
// its `keep` tensor: 1 where the current mask keeps the weight, 0 where it removes it, in the
// parameter's dtype. The packed 1-bit mask stays the state of record; `keep` is a cache that
// saves unpacking it at every step (a CUDA-friendly trade of one parameter-sized buffer per
// sparse tensor, until a fused kernel reads the bits directly).
//
// AdamS differs from Adam only in μ̃ (the momentum a masked weight uses, decayed toward
// λ·sign(θ)) and in v being the average of μ̃² instead of g². So a step is:
//
//   μ  ← lerp(μ, g, 1 − β1)                  _foreach_lerp_                       (sparse)
//   μ̃  ← μ where kept, (1 − α)·μ + αλ·sign(θ) where masked
//                                  _foreach_sign, _foreach_mul_, _foreach_lerp_ (×2; ×1 once α = 1)
//   then AdamW with β1 = 0 on "gradient" μ̃ (θ ← θ·(1 − lr·wd), exp_avg ← μ̃,
//   v ← β2·v + (1 − β2)·μ̃², θ ← θ − lr/(1 − β1^s) · μ̃ / (sqrt(v)/sqrt(1 − β2^s) + ε))
//                                                                     _fused_adamw_
//   and the dense tensors: torch's own fused AdamW step               _fused_adamw_
//
// That is 6 calls for the sparse tensors of one step count (5 once α = 1) plus 1 for the
// dense ones. In memory traffic a sparse tensor costs about 18 passes over its size (21
// during the α ramp), what AdamW(foreach=True) spends on a dense one (20 with its decay
// pass); and one parameter-sized temporary (μ̃), as AdamW(foreach=True) has one (sqrt(v)).
//
// The decoupled weight decay rides in `_fused_adamw_` (a separate `_foreach_mul_` cost two
// passes more, about 9 % of the step). The sparse call's lr is lr/(1 − β1^s) (the first
// moment's bias correction moves into it), so it gets weight decay wd·(1 − β1^s), which keeps
// the product lr·wd up to one rounding of it in double: the factor 1 − lr·wd that the kernel
// rounds to the parameter's dtype (float32 or narrower) is the same unless that double
// lands on a float32 rounding boundary. For bf16/fp16 the fused decay rounds θ once, where
// a separate multiply rounded it twice; dense tensors get exactly torch's AdamW(fused=True).
//
// `_fused_adamw_` assumes its tensors share one dense layout (on CPU it walks raw memory),
// so it takes only entries whose tensors are all contiguous; the others take the same
// arithmetic in 9 `_foreach_*` calls (below, `foreach_route`; 10 with weight decay, a
// `_foreach_mul_` by 1 − lr·wd first). A group whose tensors have taken different numbers of
// steps makes one fused call per step count (the step is one tensor per call; usually there
// is one count) and per weight decay (it is one per param group).
// No call reads a value back to the host, so on CUDA the step never synchronises.
//
// `masked_lr_scale` r ≠ 1 (masked weights step r times the kept weights' lr; not the paper's
// AdamS, opt-in): `_fused_adamw_` has one lr per call, so a sparse entry with r ≠ 1 takes the
// `_foreach_*` route, where the numerator becomes lerp(r·μ̃, μ̃, keep) (μ̃ exactly where kept,
// r·μ̃ where masked): 2 calls and one temporary more for those tensors.
//
// Non-finite values: the blend is arithmetic (there is no `_foreach_where`), so an infinite μ
// or a NaN θ gives NaN in μ̃ where the fast path's per-element select keeps ±inf or μ; the
// elements of θ that end non-finite are the same.

#include "adams_foreach.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <utility>
#include <vector>

namespace {
void write_message(const char* text, char* message, size_t message_len) {
  if (message == nullptr || message_len == 0) return;
  std::strncpy(message, text, message_len - 1);
  message[message_len - 1] = '\0';
}
}  // namespace


namespace {

struct Lists {
  std::vector<at::Tensor> p, g, mu, v, keep;
  std::vector<const CastForeachScalars*> sc;
  void add(const at::Tensor& p_, const at::Tensor& g_, const at::Tensor& mu_, const at::Tensor& v_,
           const at::Tensor* keep_, const CastForeachScalars* sc_) {
    p.push_back(p_);
    g.push_back(g_);
    mu.push_back(mu_);
    v.push_back(v_);
    if (keep_ != nullptr) keep.push_back(*keep_);
    sc.push_back(sc_);
  }
  bool empty() const { return p.empty(); }
};

// μ ← lerp(μ, g, 1 − β1), then μ̃ of the sparse tensors, built in one new tensor list (the
// step's only parameter-sized temporaries, as AdamW(foreach=True) has one list, its sqrt(v)):
//   μ̃ ← λ·sign(θ)                  exact: ±λ or 0
//   μ̃ ← lerp(μ̃, μ, keep)           μ exactly where kept (weight 1), λ·sign(θ) where masked
//   μ̃ ← lerp(μ̃, μ, 1 − α)          (only while some α < 1) kept: lerp(μ, μ, ·) = μ exactly;
//                                   masked: (1 − α)·μ + αλ·sign(θ)
// torch's lerp is exact at both ends of its weight (it computes end − (end − start)·(1 − w)
// for w ≥ 0.5), so kept weights get μ bit for bit and masked ones exactly λ·sign(θ) once
// α = 1, where the third call is skipped. Not μ + α·drop·(λ·sign(θ) − μ): at α = 1 that
// cancels |μ| against itself and leaves the rounding of |μ| (in bf16, 2^-9·|μ|) in place of a
// λ that may be far smaller than |μ|. During the ramp the masked value is within a few
// roundings of max(|μ|, λ) of the fast path's (1 − α)·μ + αλ·sign(θ).
//
// `decay_pending`: θ has not yet been multiplied by its weight-decay factor d = 1 − lr·wd (the
// fused route decays inside `_fused_adamw_`), while AdamS takes the sign of the decayed θ.
// sign(d·θ) = sign(d)·sign(θ), so λ is multiplied by sign(d): nothing changes for the usual
// d > 0, and lr·wd ≥ 1 (d ≤ 0) still gives the fast path's signs.
std::vector<at::Tensor> mutilde(Lists& s, double beta1, bool decay_pending) {
  at::_foreach_lerp_(s.mu, s.g, 1.0 - beta1);
  std::vector<at::Scalar> l1, one_minus_alpha;
  bool ramp = false;
  for (const auto* c : s.sc) {
    const double decay_sign = !decay_pending || c->decay > 0.0 ? 1.0 : (c->decay < 0.0 ? -1.0 : 0.0);
    l1.emplace_back(c->l1 * decay_sign);
    one_minus_alpha.emplace_back(1.0 - c->alpha);
    ramp = ramp || c->alpha < 1.0;
  }
  std::vector<at::Tensor> mt = at::_foreach_sign(s.p);
  at::_foreach_mul_(mt, l1);
  at::_foreach_lerp_(mt, s.mu, s.keep);
  if (ramp) at::_foreach_lerp_(mt, s.mu, one_minus_alpha);
  return mt;
}

// Entries whose tensors are all contiguous and have taken the same step s, with weight decay wd.
void fused_route(Lists& dense, Lists& sparse, double step, double wd, double lr, double beta1, double beta2,
                 double eps) {
  const at::Tensor& any = dense.empty() ? sparse.p[0] : dense.p[0];
  // `_fused_adamw_` reads the step from a float tensor on the parameters' device (it does
  // not increment it: the caller keeps the counters).
  at::Tensor s = at::full({}, step, at::TensorOptions().dtype(at::kFloat).device(any.device()));
  if (!dense.empty()) {
    std::vector<at::Tensor> steps(dense.p.size(), s);
    at::_fused_adamw_(dense.p, dense.g, dense.mu, dense.v, {}, steps, lr, beta1, beta2, wd, eps, false, false);
  }
  if (!sparse.empty()) {
    std::vector<at::Tensor> mt = mutilde(sparse, beta1, /*decay_pending=*/true);
    std::vector<at::Tensor> steps(sparse.p.size(), s);
    // β1 = 0: exp_avg ← μ̃ (a scratch tensor, also the "gradient") and no first-moment bias
    // correction, which moves into the learning rate; the weight decay moves the other way
    // so that lr·wd is unchanged (header).
    const double bc1 = 1.0 - std::pow(beta1, step);
    at::_fused_adamw_(sparse.p, mt, mt, sparse.v, {}, steps, lr / bc1, 0.0, beta2, wd * bc1, eps, false, false);
  }
}

// Any layout: the same arithmetic from `_foreach_*` calls. θ − step_size·y / (sqrt(v)·c + ε)
// is computed as θ − (step_size/c)·y / (sqrt(v) + ε/c), c = 1/sqrt(1 − β2^s), which saves a
// pass (a few roundings from the fast path's order, no more).
void foreach_route(Lists& dense, Lists& sparse, double beta1, double beta2, double eps) {
  std::vector<at::Tensor> p, sq, num, v;
  std::vector<at::Scalar> neg_step_over_c, eps_over_c;
  auto scalars = [&](const CastForeachScalars* c) {
    neg_step_over_c.emplace_back(-c->step_size / c->inv_bc2_sqrt);
    eps_over_c.emplace_back(eps / c->inv_bc2_sqrt);
  };
  if (!dense.empty()) {
    at::_foreach_lerp_(dense.mu, dense.g, 1.0 - beta1);
    for (size_t i = 0; i < dense.p.size(); ++i) {
      p.push_back(dense.p[i]);
      sq.push_back(dense.g[i]);
      num.push_back(dense.mu[i]);
      v.push_back(dense.v[i]);
      scalars(dense.sc[i]);
    }
  }
  if (!sparse.empty()) {
    std::vector<at::Tensor> mt = mutilde(sparse, beta1, /*decay_pending=*/false);
    // The numerator: μ̃, or lerp(r·μ̃, μ̃, keep) when some tensor has r ≠ 1 (lerp is exact
    // at weights 0 and 1, so kept weights get μ̃ bit for bit).
    std::vector<at::Tensor> top = mt;
    std::vector<at::Scalar> ratio;
    bool scaled = false;
    for (const auto* c : sparse.sc) {
      ratio.emplace_back(c->masked_lr_scale);
      scaled = scaled || c->masked_lr_scale != 1.0;
    }
    if (scaled) {
      top = at::_foreach_mul(mt, ratio);
      at::_foreach_lerp_(top, mt, sparse.keep);
    }
    for (size_t i = 0; i < sparse.p.size(); ++i) {
      p.push_back(sparse.p[i]);
      sq.push_back(mt[i]);
      num.push_back(top[i]);
      v.push_back(sparse.v[i]);
      scalars(sparse.sc[i]);
    }
  }
  at::_foreach_mul_(v, beta2);
  at::_foreach_addcmul_(v, sq, sq, 1.0 - beta2);
  std::vector<at::Tensor> denom = at::_foreach_sqrt(v);
  at::_foreach_add_(denom, eps_over_c);
  at::_foreach_addcdiv_(p, num, denom, neg_step_over_c);
}

bool contiguous(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t != nullptr && !t->is_contiguous()) return false;
  return true;
}

}  // namespace

extern "C" {
// Returns 0, or 3 with a NUL-terminated message in `message` (at most `message_len` bytes).
int32_t cast_rs_adams_foreach(size_t k, const at::Tensor* const* params, const at::Tensor* const* grads,
                              const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                              const at::Tensor* const* keeps, const CastForeachScalars* scalars, double lr,
                              double beta1, double beta2, double eps, char* message, size_t message_len) {
  try {
    // Contiguous entries by (step count, weight decay) in first-seen order, and the rest.
    std::vector<std::pair<double, double>> keys;
    std::vector<std::pair<Lists, Lists>> by_key;  // (dense, sparse)
    Lists other_dense, other_sparse;
    std::vector<at::Tensor> decayed;  // the rest's tensors with weight decay
    std::vector<at::Scalar> factors;
    for (size_t i = 0; i < k; ++i) {
      const at::Tensor* d = keeps[i];
      // `_fused_adamw_` has one lr per call: a sparse tensor whose masked weights take
      // another (r ≠ 1) goes the `_foreach_*` way.
      const bool fused = contiguous({params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], d}) &&
                         (d == nullptr || scalars[i].masked_lr_scale == 1.0);
      Lists* dest;
      if (fused) {
        const std::pair<double, double> key{scalars[i].step, scalars[i].weight_decay};
        size_t j = 0;
        while (j < keys.size() && keys[j] != key) ++j;
        if (j == keys.size()) {
          keys.push_back(key);
          by_key.emplace_back();
        }
        dest = d != nullptr ? &by_key[j].second : &by_key[j].first;
      } else {
        dest = d != nullptr ? &other_sparse : &other_dense;
        if (scalars[i].decay != 1.0) {
          decayed.push_back(*params[i]);
          factors.emplace_back(scalars[i].decay);
        }
      }
      dest->add(*params[i], *grads[i], *exp_avgs[i], *exp_avg_sqs[i], d, &scalars[i]);
    }
    for (size_t j = 0; j < keys.size(); ++j)
      fused_route(by_key[j].first, by_key[j].second, keys[j].first, keys[j].second, lr, beta1, beta2, eps);
    // Decoupled weight decay first (as AdamW), on the tensors that have it.
    if (!decayed.empty()) at::_foreach_mul_(decayed, factors);
    if (!other_dense.empty() || !other_sparse.empty()) foreach_route(other_dense, other_sparse, beta1, beta2, eps);
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
