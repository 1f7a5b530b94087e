// The multi-tensor AdamS step of the generic path: a fixed number of ATen multi-tensor calls
// per (device, dtype) group, whatever the number of parameters, as torch.optim.AdamW
// (foreach=True / fused=True) does. This is the path every CUDA tensor takes until a fused
// CUDA kernel of our own exists (on CUDA each call below is one multi-tensor kernel launch),
// and the path of any CPU tensor the slice kernels do not take (fp64, non-contiguous).
//
// Rust (src/generic.rs) calls it through the C ABI below, after it has refreshed the masks
// that are due (per tensor, every `mask_interval` steps) and made sure every sparse tensor has
// its `drop` tensor: 1 where the current mask removes the weight, 0 where it keeps it, in the
// parameter's dtype. The packed 1-bit mask stays the state of record; `drop` is a cache that
// saves unpacking it at every step (a CUDA-friendly trade of one parameter-sized buffer per
// sparse tensor, until a fused kernel reads the bits directly).
//
// AdamS differs from Adam only in μ̃ (the momentum a masked weight uses, decayed toward
// λ·sign(θ)) and in v being the average of μ̃² instead of g². So a step is:
//
//   P  ← P · (1 − lr·wd)                     _foreach_mul_   (the tensors with wd ≠ 0 only)
//   μ  ← lerp(μ, g, 1 − β1)                  _foreach_lerp_                       (sparse)
//   μ̃  ← μ − α·drop·μ + αλ·drop·sign(θ)      _foreach_sign, _foreach_addcmul, _foreach_addcmul_
//   then Adam with β1 = 0 on "gradient" μ̃ (exp_avg ← μ̃, v ← β2·v + (1 − β2)·μ̃²,
//   θ ← θ − lr/(1 − β1^s) · μ̃ / (sqrt(v)/sqrt(1 − β2^s) + ε))       _fused_adam_
//   and the dense tensors: torch's own fused Adam step                _fused_adam_
//
// That is 5 calls for the sparse tensors of one step count (6 with weight decay) plus 1 for
// the dense ones; in memory traffic a sparse tensor costs about 18 passes over its size,
// what AdamW(foreach=True) costs a dense one. `_fused_adam_` assumes its tensors share one
// dense layout (on CPU it walks raw memory), so it takes only entries whose tensors are all
// contiguous; the others take the same arithmetic in 9 `_foreach_*` calls (below,
// `foreach_route`). A group whose tensors have taken different numbers of steps makes one
// fused call per step count (the step is one tensor per call; usually there is one count).
// No call reads a value back to the host, so on CUDA the step never synchronises.
//
// Non-finite values: the blend is arithmetic (there is no `_foreach_where`), so an infinite μ
// gives NaN in μ̃ where the fast path's per-element select keeps ±inf; the elements that end
// non-finite are the same.

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

extern "C" {
// Mirrors ForeachScalars in src/generic.rs.
struct CastForeachScalars {
  double step;          // s, the step being taken (>= 1)
  double decay;         // 1 − lr·wd
  double l1;            // λ (sparse tensors)
  double alpha;         // α = min(1, s / T) (sparse tensors)
  double step_size;     // lr / (1 − β1^s)
  double inv_bc2_sqrt;  // 1 / sqrt(1 − β2^s)
};
}

namespace {

struct Lists {
  std::vector<at::Tensor> p, g, mu, v, drop;
  std::vector<const CastForeachScalars*> sc;
  void add(const at::Tensor& p_, const at::Tensor& g_, const at::Tensor& mu_, const at::Tensor& v_,
           const at::Tensor* drop_, const CastForeachScalars* sc_) {
    p.push_back(p_);
    g.push_back(g_);
    mu.push_back(mu_);
    v.push_back(v_);
    if (drop_ != nullptr) drop.push_back(*drop_);
    sc.push_back(sc_);
  }
  bool empty() const { return p.empty(); }
};

// μ ← lerp(μ, g, 1 − β1), then μ̃ = μ − α·drop·μ + αλ·drop·sign(θ) of sparse tensors: two
// fused multiply-adds in the op's f32 arithmetic. Where kept (drop = 0) this is μ exactly;
// where masked it is (1 − α)·μ + αλ·sign(θ), and exactly λ·sign(θ) once α = 1 (α·μ·1 == μ).
// Not μ + α·drop·(λ·sign(θ) − μ): at α = 1 that cancels |μ| against itself and leaves the
// rounding of |μ| (in bf16, 2^-9·|μ|) in place of a λ that may be far smaller than |μ|.
std::vector<at::Tensor> mutilde(Lists& s, double beta1) {
  at::_foreach_lerp_(s.mu, s.g, 1.0 - beta1);
  std::vector<at::Scalar> neg_alpha, alpha_l1;
  for (const auto* c : s.sc) {
    neg_alpha.emplace_back(-c->alpha);
    alpha_l1.emplace_back(c->alpha * c->l1);
  }
  std::vector<at::Tensor> sign = at::_foreach_sign(s.p);
  std::vector<at::Tensor> mt = at::_foreach_addcmul(s.mu, s.mu, s.drop, neg_alpha);
  at::_foreach_addcmul_(mt, sign, s.drop, alpha_l1);
  return mt;
}

// Entries whose tensors are all contiguous and have taken the same step s.
void fused_route(Lists& dense, Lists& sparse, double step, double lr, double beta1, double beta2, double eps) {
  const at::Tensor& any = dense.empty() ? sparse.p[0] : dense.p[0];
  // `_fused_adam_` reads the step from a float tensor on the parameters' device (it does
  // not increment it: the caller keeps the counters).
  at::Tensor s = at::full({}, step, at::TensorOptions().dtype(at::kFloat).device(any.device()));
  if (!dense.empty()) {
    std::vector<at::Tensor> steps(dense.p.size(), s);
    at::_fused_adam_(dense.p, dense.g, dense.mu, dense.v, {}, steps, lr, beta1, beta2, 0.0, eps, false, false);
  }
  if (!sparse.empty()) {
    std::vector<at::Tensor> mt = mutilde(sparse, beta1);
    std::vector<at::Tensor> steps(sparse.p.size(), s);
    // β1 = 0: exp_avg ← μ̃ (a scratch tensor, also the "gradient") and no first-moment bias
    // correction, which moves into the learning rate.
    at::_fused_adam_(sparse.p, mt, mt, sparse.v, {}, steps, lr / (1.0 - std::pow(beta1, step)), 0.0, beta2, 0.0,
                     eps, false, false);
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
    std::vector<at::Tensor> mt = mutilde(sparse, beta1);
    for (size_t i = 0; i < sparse.p.size(); ++i) {
      p.push_back(sparse.p[i]);
      sq.push_back(mt[i]);
      num.push_back(mt[i]);
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
                              const at::Tensor* const* drops, const CastForeachScalars* scalars, double lr,
                              double beta1, double beta2, double eps, char* message, size_t message_len) {
  try {
    // Decoupled weight decay first (as AdamW), on the tensors that have it.
    std::vector<at::Tensor> decayed;
    std::vector<at::Scalar> factors;
    for (size_t i = 0; i < k; ++i) {
      if (scalars[i].decay != 1.0) {
        decayed.push_back(*params[i]);
        factors.emplace_back(scalars[i].decay);
      }
    }
    if (!decayed.empty()) at::_foreach_mul_(decayed, factors);
    // Contiguous entries by step count (in first-seen order), and the rest.
    std::vector<double> step_values;
    std::vector<std::pair<Lists, Lists>> by_step;  // (dense, sparse)
    Lists other_dense, other_sparse;
    for (size_t i = 0; i < k; ++i) {
      const at::Tensor* d = drops[i];
      const bool fused = contiguous({params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], d});
      Lists* dest;
      if (fused) {
        size_t j = 0;
        while (j < step_values.size() && step_values[j] != scalars[i].step) ++j;
        if (j == step_values.size()) {
          step_values.push_back(scalars[i].step);
          by_step.emplace_back();
        }
        dest = d != nullptr ? &by_step[j].second : &by_step[j].first;
      } else {
        dest = d != nullptr ? &other_sparse : &other_dense;
      }
      dest->add(*params[i], *grads[i], *exp_avgs[i], *exp_avg_sqs[i], d, &scalars[i]);
    }
    for (size_t j = 0; j < step_values.size(); ++j)
      fused_route(by_step[j].first, by_step[j].second, step_values[j], lr, beta1, beta2, eps);
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
