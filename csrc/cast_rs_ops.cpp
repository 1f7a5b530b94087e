// cast-rs kernels as PyTorch operators: torch.ops.cast_rs.* from Python, TorchScript and C++
// (c10::Dispatcher), visible to torch.compile and torch.export.
//
// An operator here is a schema (TORCH_LIBRARY) plus one thin function per device
// (TORCH_LIBRARY_IMPL) that checks what only C++ sees and calls the Rust entry point through
// the small C ABI of src/capi.rs. The Rust side owns every argument rule (src/checks/) and
// picks the path: the slice kernels for contiguous CPU tensors of their dtype, the generic
// libtorch ops otherwise (any device, CUDA included), so the CPU and CUDA registrations are
// the same function until CUDA kernels of our own exist.
//
// Fake (meta) implementations are registered from Python, in python/cast_rs/_registrations.py
// (set_python_module below tells torch where to find them); the one autograd formula
// (weight scaling) is registered here, at the Autograd key.

// Python.h first, as Python asks of every file that includes it.
#include <Python.h>

#include "adams_foreach.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

extern "C" {
// Mirrors CastStepScalars in src/capi.rs.
struct CastStepScalars {
  const double* hyper;  // AdamsHyper::FIELDS, in that order
  size_t hyper_len;
  double total_steps;
  bool has_total_steps;
  int64_t mask_interval;
  bool force_generic;
};

void cast_rs_free_message(char* message);
int32_t cast_rs_set_python_error();
int32_t cast_rs_nm_mask(const at::Tensor* x, int64_t n, int64_t m, int64_t dim, bool force_generic,
                        bool packed, at::Tensor** out, char** message);
int32_t cast_rs_unpack_mask(const at::Tensor* bits, const int64_t* shape, size_t ndim, at::Tensor** out,
                            char** message);
int32_t cast_rs_scale_forward(const at::Tensor* weight, const at::Tensor* scale, int64_t groups, int64_t dim,
                              bool force_generic, at::Tensor** out, char** message);
int32_t cast_rs_scale_backward(const at::Tensor* grad, const at::Tensor* weight, const at::Tensor* scale,
                               int64_t groups, int64_t dim, bool force_generic, at::Tensor** grad_weight,
                               at::Tensor** grad_scale, char** message);
int32_t cast_rs_adams_step(size_t k, const at::Tensor* const* params, const at::Tensor* const* grads,
                           const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                           const at::Tensor* const* masks, const int64_t* patterns,
                           const at::Tensor* const* steps, const at::Tensor* const* keep_cache,
                           const CastStepScalars* scalars, const double* l1_decays, const double* weight_decays,
                           bool validate_only, int64_t* flips, bool* fast, CastForeachScalars* foreach_scalars,
                           at::Tensor** foreach_keeps, double* foreach_hyper, char** message);
int32_t cast_rs_nm_compress(const at::Tensor* weight, int64_t n, int64_t m, at::Tensor** values, at::Tensor** index,
                            char** message);
int32_t cast_rs_nm_compress_int8(const at::Tensor* weight, int64_t n, int64_t m, at::Tensor** values,
                                 at::Tensor** index, at::Tensor** scales, char** message);
int32_t cast_rs_nm_decompress(const at::Tensor* values, const at::Tensor* index, int64_t rows, int64_t cols,
                              int64_t n, int64_t m, const at::Tensor* scales, at::Tensor** out, char** message);
int32_t cast_rs_nm_linear(const at::Tensor* input, const at::Tensor* values, const at::Tensor* index,
                          const at::Tensor* bias, int64_t rows, int64_t cols, int64_t n, int64_t m,
                          const at::Tensor* scales, at::Tensor** out, char** message);
// Anchors this object file in the extension (src/capi.rs calls it once at import), so the
// linker keeps the static registrations below.
int32_t cast_rs_operators_linked() { return 1; }
}

namespace cast_rs {
namespace {

// Status codes of src/capi.rs.
constexpr int32_t kOk = 0, kValueError = 1, kTypeError = 2;

// Throws the error of a failed Rust call. In a Python process: the exception object the Rust
// side builds (the class and the structured fields every other route raises), as a pybind11
// error_already_set, which the Python binding of torch.ops restores as it is. Elsewhere (a C++
// caller without Python): c10::ValueError / TypeError / Error with the same message.
// (Called after the Rust call returned, never as `check(call(..., &message), message)`: the
// order in which arguments are evaluated is unspecified.)
void check(int32_t status, char* message) {
  if (status == kOk) return;
  std::string text = message ? message : "cast-rs: unknown error";
  cast_rs_free_message(message);
  if (Py_IsInitialized()) {
    pybind11::gil_scoped_acquire gil;
    if (cast_rs_set_python_error() == 1) throw pybind11::error_already_set();
  }
  TORCH_CHECK_VALUE(status != kValueError, text);
  TORCH_CHECK_TYPE(status != kTypeError, text);
  TORCH_CHECK(false, text);
}

// Takes over a tensor handed out by Rust (a heap at::Tensor).
at::Tensor take(at::Tensor* p) {
  at::Tensor t = std::move(*p);
  delete p;
  return t;
}

at::Tensor mask(const at::Tensor& x, int64_t n, int64_t m, int64_t dim, bool force_generic, bool packed) {
  at::Tensor* out = nullptr;
  char* message = nullptr;
  const int32_t status = cast_rs_nm_mask(&x, n, m, dim, force_generic, packed, &out, &message);
  check(status, message);
  return take(out);
}

at::Tensor nm_mask(const at::Tensor& x, int64_t n, int64_t m, int64_t dim, bool force_generic) {
  return mask(x, n, m, dim, force_generic, false);
}

at::Tensor nm_mask_packed(const at::Tensor& x, int64_t n, int64_t m, int64_t dim, bool force_generic) {
  return mask(x, n, m, dim, force_generic, true);
}

at::Tensor unpack_mask(const at::Tensor& bits, at::IntArrayRef shape) {
  at::Tensor* out = nullptr;
  char* message = nullptr;
  const int32_t status = cast_rs_unpack_mask(&bits, shape.data(), shape.size(), &out, &message);
  check(status, message);
  return take(out);
}

at::Tensor scale_forward(const at::Tensor& weight, const at::Tensor& scale, int64_t groups, int64_t dim,
                         bool force_generic) {
  at::Tensor* out = nullptr;
  char* message = nullptr;
  const int32_t status = cast_rs_scale_forward(&weight, &scale, groups, dim, force_generic, &out, &message);
  check(status, message);
  return take(out);
}

std::tuple<at::Tensor, at::Tensor> scale_backward(const at::Tensor& grad, const at::Tensor& weight,
                                                  const at::Tensor& scale, int64_t groups, int64_t dim,
                                                  bool force_generic) {
  at::Tensor *gw = nullptr, *ga = nullptr;
  char* message = nullptr;
  // The kernels read the incoming gradient as one block (autograd may hand over an
  // expanded or transposed one).
  at::Tensor g = grad.contiguous();
  const int32_t status = cast_rs_scale_backward(&g, &weight, &scale, groups, dim, force_generic, &gw, &ga, &message);
  check(status, message);
  return {take(gw), take(ga)};
}

// The weight-scaling autograd formula, at the operator (as torchvision's ops): eager calls,
// torch.compile and C++ callers all differentiate scale_forward the same way.
//   ∂L/∂W = ∂L/∂W_s · A (broadcast over each block), ∂L/∂A[r, j] = Σ_block ∂L/∂W_s · W.
class ScaleFunction : public torch::autograd::Function<ScaleFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& scale,
                            int64_t groups, int64_t dim, bool force_generic) {
    ctx->save_for_backward({weight, scale});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["force_generic"] = force_generic;
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("cast_rs::scale_forward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool)>();
    return op.call(weight, scale, groups, dim, force_generic);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("cast_rs::scale_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, int64_t, int64_t, bool)>();
    auto [grad_weight, grad_scale] =
        op.call(grads[0], saved[0], saved[1], ctx->saved_data["groups"].toInt(), ctx->saved_data["dim"].toInt(),
                ctx->saved_data["force_generic"].toBool());
    return {grad_weight, grad_scale, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor scale_forward_autograd(const at::Tensor& weight, const at::Tensor& scale, int64_t groups, int64_t dim,
                                  bool force_generic) {
  return ScaleFunction::apply(weight, scale, groups, dim, force_generic);
}

std::vector<const at::Tensor*> pointers(at::TensorList ts) {
  std::vector<const at::Tensor*> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(&t);
  return out;
}

// Pointers to the entries of an optional-tensor list (null for None); `keep_alive` holds the
// tensors so that the pointers stay valid.
std::vector<const at::Tensor*> optional_pointers(const c10::List<std::optional<at::Tensor>>& list,
                                                 std::vector<at::Tensor>& keep_alive) {
  const size_t k = list.size();
  keep_alive.clear();
  keep_alive.reserve(k);
  std::vector<const at::Tensor*> out(k, nullptr);
  for (size_t i = 0; i < k; ++i) {
    std::optional<at::Tensor> t = list.get(i);
    keep_alive.push_back(t.has_value() ? *t : at::Tensor());
    if (t.has_value() && t->defined()) out[i] = &keep_alive.back();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> adams_step_(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    const c10::List<std::optional<at::Tensor>>& masks, at::IntArrayRef patterns, at::TensorList steps,
    const c10::List<std::optional<at::Tensor>>& keep_cache, at::ArrayRef<double> hyper,
    std::optional<double> total_steps, int64_t mask_interval, std::optional<at::ArrayRef<double>> l1_decays,
    std::optional<at::ArrayRef<double>> weight_decays, bool force_generic, bool validate_only) {
  const size_t k = params.size();
  // List lengths are the one thing the C ABI cannot check (it takes k entries of each).
  auto same = [k](const char* name, size_t len) {
    TORCH_CHECK_VALUE(len == k, name, ": expected ", k, " entries (one per parameter), got ", len);
  };
  same("grads", grads.size());
  same("exp_avgs", exp_avgs.size());
  same("exp_avg_sqs", exp_avg_sqs.size());
  same("masks", masks.size());
  TORCH_CHECK_VALUE(patterns.size() == 3 * k, "patterns: expected ", 3 * k,
                    " values ((n, m, dim) per parameter, n = 0 for a dense one), got ", patterns.size());
  same("steps", steps.size());
  TORCH_CHECK_VALUE(keep_cache.size() == 0 || keep_cache.size() == k, "keep_cache: expected 0 or ", k,
                    " entries (one per parameter), got ", keep_cache.size());
  if (l1_decays) same("l1_decays", l1_decays->size());
  if (weight_decays) same("weight_decays", weight_decays->size());

  std::vector<at::Tensor> mask_values, keep_values;
  const std::vector<const at::Tensor*> mask_ptrs = optional_pointers(masks, mask_values);
  const std::vector<const at::Tensor*> keep_ptrs = optional_pointers(keep_cache, keep_values);
  const CastStepScalars scalars{hyper.data(),
                                hyper.size(),
                                total_steps.value_or(0.0),
                                total_steps.has_value(),
                                mask_interval,
                                force_generic};
  at::Tensor flips = at::empty({static_cast<int64_t>(k)}, at::kLong);
  at::Tensor fast = at::empty({static_cast<int64_t>(k)}, at::kBool);
  std::vector<CastForeachScalars> foreach_scalars(k);
  std::vector<at::Tensor*> foreach_keeps(k, nullptr);
  double foreach_hyper[4] = {0.0, 0.0, 0.0, 0.0};  // lr, beta1, beta2, eps
  char* message = nullptr;
  auto p = pointers(params), g = pointers(grads), mu = pointers(exp_avgs), v = pointers(exp_avg_sqs),
       s = pointers(steps);
  const int32_t status = cast_rs_adams_step(
      k, p.data(), g.data(), mu.data(), v.data(), mask_ptrs.data(), patterns.data(), s.data(),
      keep_cache.size() == 0 ? nullptr : keep_ptrs.data(), &scalars, l1_decays ? l1_decays->data() : nullptr,
      weight_decays ? weight_decays->data() : nullptr, validate_only, flips.data_ptr<int64_t>(),
      fast.data_ptr<bool>(), foreach_scalars.data(), foreach_keeps.data(), foreach_hyper, &message);
  check(status, message);
  // The generic-path tensors: checked, their masks refreshed and their steps counted by the
  // Rust side, which leaves their multi-tensor step to this one call per (device, dtype).
  std::vector<at::Tensor> keeps(k);
  for (size_t i = 0; i < k; ++i)
    if (foreach_keeps[i] != nullptr) keeps[i] = take(foreach_keeps[i]);
  if (!validate_only) {
    const bool* took_fast = fast.data_ptr<bool>();
    std::vector<bool> done(k, false);
    for (size_t i = 0; i < k; ++i) {
      if (took_fast[i] || done[i]) continue;
      std::vector<const at::Tensor*> gp, gg, gmu, gv, gkeep;
      std::vector<CastForeachScalars> gsc;
      for (size_t j = i; j < k; ++j) {
        if (took_fast[j] || done[j] || params[j].device() != params[i].device() ||
            params[j].scalar_type() != params[i].scalar_type())
          continue;
        done[j] = true;
        gp.push_back(p[j]);
        gg.push_back(g[j]);
        gmu.push_back(mu[j]);
        gv.push_back(v[j]);
        gkeep.push_back(keeps[j].defined() ? &keeps[j] : nullptr);
        gsc.push_back(foreach_scalars[j]);
      }
      char text[1024] = {0};
      const int32_t rc = cast_rs_adams_foreach(gp.size(), gp.data(), gg.data(), gmu.data(), gv.data(), gkeep.data(),
                                               gsc.data(), foreach_hyper[0], foreach_hyper[1], foreach_hyper[2],
                                               foreach_hyper[3], text, sizeof(text));
      TORCH_CHECK(rc == 0, "adams_step (generic path): ", text);
    }
  }
  return {flips, fast};
}

std::tuple<at::Tensor, at::Tensor> nm_compress(const at::Tensor& weight, int64_t n, int64_t m) {
  at::Tensor *values = nullptr, *index = nullptr;
  char* message = nullptr;
  const int32_t status = cast_rs_nm_compress(&weight, n, m, &values, &index, &message);
  check(status, message);
  return {take(values), take(index)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nm_compress_int8(const at::Tensor& weight, int64_t n, int64_t m) {
  at::Tensor *values = nullptr, *index = nullptr, *scales = nullptr;
  char* message = nullptr;
  const int32_t status = cast_rs_nm_compress_int8(&weight, n, m, &values, &index, &scales, &message);
  check(status, message);
  return {take(values), take(index), take(scales)};
}

// The tensor of an optional argument, or null for None.
const at::Tensor* optional_pointer(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

at::Tensor nm_decompress(const at::Tensor& values, const at::Tensor& index, int64_t rows, int64_t cols, int64_t n,
                         int64_t m, const std::optional<at::Tensor>& scales) {
  at::Tensor* out = nullptr;
  char* message = nullptr;
  const int32_t status =
      cast_rs_nm_decompress(&values, &index, rows, cols, n, m, optional_pointer(scales), &out, &message);
  check(status, message);
  return take(out);
}

at::Tensor nm_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& index,
                     const std::optional<at::Tensor>& bias, int64_t rows, int64_t cols, int64_t n, int64_t m,
                     const std::optional<at::Tensor>& scales) {
  at::Tensor* out = nullptr;
  char* message = nullptr;
  const int32_t status = cast_rs_nm_linear(&input, &values, &index, optional_pointer(bias), rows, cols, n, m,
                                           optional_pointer(scales), &out, &message);
  check(status, message);
  return take(out);
}

}  // namespace

TORCH_LIBRARY(cast_rs, m) {
  m.set_python_module("cast_rs._registrations");
  m.def("nm_mask(Tensor x, int n, int m, int dim=-1, bool force_generic=False) -> Tensor");
  m.def("nm_mask_packed(Tensor x, int n, int m, int dim=-1, bool force_generic=False) -> Tensor");
  m.def("unpack_mask(Tensor bits, int[] shape) -> Tensor");
  m.def("scale_forward(Tensor weight, Tensor scale, int groups, int dim=-1, bool force_generic=False) -> Tensor");
  m.def(
      "scale_backward(Tensor grad, Tensor weight, Tensor scale, int groups, int dim=-1, "
      "bool force_generic=False) -> (Tensor, Tensor)");
  m.def(
      "adams_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)?[] masks, int[] patterns, Tensor(e!)[] steps, Tensor(f!)?[] keep_cache, *, float[] hyper, "
      "float? total_steps, int mask_interval, float[]? l1_decays=None, float[]? weight_decays=None, "
      "bool force_generic=False, bool validate_only=False) -> (Tensor, Tensor)");
  // Compressed N:M linear layers (CPU inference): src/nm_linear/layout.rs has the layout.
  // int8 values carry one float32 scale per output row (src/nm_linear/quant.rs): made by
  // nm_compress_int8, passed as `scales` to the other two (None for float values).
  m.def("nm_compress(Tensor weight, int n, int m) -> (Tensor, Tensor)");
  m.def("nm_compress_int8(Tensor weight, int n, int m) -> (Tensor, Tensor, Tensor)");
  m.def(
      "nm_decompress(Tensor values, Tensor index, int rows, int cols, int n, int m, Tensor? scales=None) "
      "-> Tensor");
  m.def(
      "nm_linear(Tensor input, Tensor values, Tensor index, Tensor? bias, int rows, int cols, int n, int m, "
      "Tensor? scales=None) -> Tensor");
}

// One registration per device; the Rust side picks the slice kernels or the generic path.
#define CAST_RS_REGISTER(m)                           \
  m.impl("nm_mask", &nm_mask);                        \
  m.impl("nm_mask_packed", &nm_mask_packed);          \
  m.impl("unpack_mask", &unpack_mask);                \
  m.impl("scale_forward", &scale_forward);            \
  m.impl("scale_backward", &scale_backward);          \
  m.impl("adams_step_", &adams_step_)

TORCH_LIBRARY_IMPL(cast_rs, CPU, m) {
  CAST_RS_REGISTER(m);
  // CPU only: the compressed layout is read by the CPU kernels (a CUDA tensor gets the
  // dispatcher's "no kernel for CUDA" error).
  m.impl("nm_compress", &nm_compress);
  m.impl("nm_compress_int8", &nm_compress_int8);
  m.impl("nm_decompress", &nm_decompress);
  m.impl("nm_linear", &nm_linear);
}
TORCH_LIBRARY_IMPL(cast_rs, CUDA, m) { CAST_RS_REGISTER(m); }
TORCH_LIBRARY_IMPL(cast_rs, Autograd, m) { m.impl("scale_forward", &scale_forward_autograd); }

}  // namespace cast_rs
