// Python module ffengine._C: the compiled CPU core of ffengine.
//
//   __version__   the ffengine version this module was built for (checked by ffengine._ext)
//   has_openmp    whether the sample loop runs in parallel
//   ghost_score   see ghost_score.h
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <sstream>
#include <string>

#include "ghost_score.h"

#ifndef FFENGINE_VERSION
#error "FFENGINE_VERSION must be defined by the build (CMakeLists.txt passes it)"
#endif

namespace py = pybind11;

namespace {

std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (d) os << ", ";
    os << a.shape(d);
  }
  if (a.ndim() == 1) os << ",";
  os << ")";
  return os.str();
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

[[noreturn]] void fail(const std::string& msg) { throw py::value_error("ghost_score: " + msg); }

void check_layout(const py::array& a, const char* name) {
  const int flags = a.flags();
  if (!(flags & py::array::c_style)) {
    fail(std::string("argument '") + name + "' must be C-contiguous; received an array of shape " +
         shape_str(a) + " with non-contiguous strides (pass tensor.contiguous() or " +
         "numpy.ascontiguousarray)");
  }
  if (!(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    fail(std::string("argument '") + name + "' must be aligned to its dtype; received a " +
         "misaligned buffer (copy it first)");
  }
}

void check_ndim(const py::array& a, const char* name, py::ssize_t ndim, const char* layout) {
  if (a.ndim() != ndim) {
    fail(std::string("argument '") + name + "' must have " + std::to_string(ndim) +
         " dimensions " + layout + "; received shape " + shape_str(a));
  }
}

template <typename T>
py::tuple run(const py::array& h, const py::array& delta, const py::array& G_w,
              const std::optional<py::array>& G_b, const ffengine::GhostShape& s,
              int num_threads) {
  py::array_t<T> dots({s.B, s.K});
  py::array_t<T> sqnorm(s.B);
  const T* h_ptr = static_cast<const T*>(h.data());
  const T* d_ptr = static_cast<const T*>(delta.data());
  const T* gw_ptr = static_cast<const T*>(G_w.data());
  const T* gb_ptr = G_b ? static_cast<const T*>(G_b->data()) : nullptr;
  T* dots_ptr = dots.mutable_data();
  T* sq_ptr = sqnorm.mutable_data();
  {
    py::gil_scoped_release release;
    ffengine::ghost_score_cpu<T>(h_ptr, d_ptr, gw_ptr, gb_ptr, s, dots_ptr, sq_ptr, num_threads);
  }
  return py::make_tuple(dots, sqnorm);
}

py::tuple ghost_score(const py::array& h, const py::array& delta, const py::array& G_w,
                      const std::optional<py::array>& G_b, int num_threads) {
  check_ndim(h, "h", 3, "(B, V, d_in)");
  check_ndim(delta, "delta", 3, "(B, V, d_out)");
  check_ndim(G_w, "G_w", 3, "(K, d_out, d_in)");
  if (G_b) check_ndim(*G_b, "G_b", 2, "(K, d_out)");

  const ffengine::GhostShape s{h.shape(0), h.shape(1), h.shape(2), delta.shape(2), G_w.shape(0)};
  if (delta.shape(0) != s.B || delta.shape(1) != s.V) {
    fail("argument 'delta' must have shape (B, V, d_out) with (B, V) = (" + std::to_string(s.B) +
         ", " + std::to_string(s.V) + ") as in h " + shape_str(h) + "; received " +
         shape_str(delta));
  }
  if (G_w.shape(1) != s.d_out || G_w.shape(2) != s.d_in) {
    fail("argument 'G_w' must have shape (K, d_out, d_in) with (d_out, d_in) = (" +
         std::to_string(s.d_out) + ", " + std::to_string(s.d_in) + ") from delta " +
         shape_str(delta) + " and h " + shape_str(h) + "; received " + shape_str(G_w));
  }
  if (G_b && (G_b->shape(0) != s.K || G_b->shape(1) != s.d_out)) {
    fail("argument 'G_b' must have shape (K, d_out) = (" + std::to_string(s.K) + ", " +
         std::to_string(s.d_out) + "); received " + shape_str(*G_b));
  }

  const bool is_f32 = h.dtype().is(py::dtype::of<float>());
  const bool is_f64 = h.dtype().is(py::dtype::of<double>());
  if (!is_f32 && !is_f64) {
    fail("argument 'h' must have dtype float32 or float64; received " + dtype_str(h));
  }
  auto same_dtype = [&](const py::array& a, const char* name) {
    if (!a.dtype().is(h.dtype())) {
      fail(std::string("argument '") + name + "' must have dtype " + dtype_str(h) +
           " like h; received " + dtype_str(a));
    }
  };
  same_dtype(delta, "delta");
  same_dtype(G_w, "G_w");
  if (G_b) same_dtype(*G_b, "G_b");

  check_layout(h, "h");
  check_layout(delta, "delta");
  check_layout(G_w, "G_w");
  if (G_b) check_layout(*G_b, "G_b");

  return is_f32 ? run<float>(h, delta, G_w, G_b, s, num_threads)
                : run<double>(h, delta, G_w, G_b, s, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ffengine compiled CPU core (pybind11). Use it through ffengine.ops.";
  m.attr("__version__") = FFENGINE_VERSION;
  m.attr("has_openmp") = ffengine::has_openmp();
  m.def("ghost_score", &ghost_score, py::arg("h"), py::arg("delta"), py::arg("G_w"),
        py::arg("G_b") = py::none(), py::kw_only(), py::arg("num_threads") = 0,
        R"doc(Ghost score of one Linear layer y = W h + b against K stacked gradients.

Args:
    h: (B, V, d_in) layer inputs, float32 or float64, C-contiguous.
    delta: (B, V, d_out) backprop signals dl/dy, same dtype.
    G_w: (K, d_out, d_in) stacked weight gradients, same dtype.
    G_b: (K, d_out) stacked bias gradients, or None for a layer without bias.
    num_threads: OpenMP threads; 0 uses the OpenMP default.

Returns:
    (dots (B, K), sqnorm (B,)) in the input dtype, where
    dots[i, k] = sum_v delta[i, v] . (G_w[k] @ h[i, v]) + G_b[k] . sum_v delta[i, v]
    sqnorm[i]  = sum_{v, v'} (delta[i, v] . delta[i, v']) (h[i, v] . h[i, v'])
                 + ||sum_v delta[i, v]||^2
    (bias terms only when G_b is given). Per-sample gradients are never formed.

Raises:
    ValueError: an argument has the wrong shape, dtype or memory layout.
)doc");
}
