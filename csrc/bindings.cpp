// locdiff._C: a thin pybind11 layer over the kernels. Pointers arrive as integers
// (tensor.data_ptr()), dtypes as the strings "float32" / "float64", CUDA streams as
// integers (torch.cuda.current_stream().cuda_stream). Validation happens in Python
// (python/locdiff/ops/); here only the dtype tag is dispatched. The GIL is released while
// kernels run so that other Python threads (data loaders) keep going.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "locdiff/sh_kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

// Calls fn.template operator()<T>() for the dtype tag; anything else is a caller bug.
template <typename Fn>
void dispatch_float(const std::string& dtype, Fn&& fn) {
  if (dtype == "float32") {
    fn(float{});
  } else if (dtype == "float64") {
    fn(double{});
  } else {
    throw std::invalid_argument("locdiff._C: dtype must be 'float32' or 'float64', got '" + dtype + "'");
  }
}

[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string("locdiff was built without CUDA, so ") + what +
                           " cannot run on a CUDA tensor; rebuild with nvcc on PATH "
                           "(LOCDIFF_CUDA=ON makes a missing nvcc a build error)");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "locdiff compiled kernels (CPU always, CUDA when built with nvcc)";

  m.def("has_cuda", [] {
#ifdef LOCDIFF_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when this build contains the CUDA kernels.");

  // ---- spherical harmonics -------------------------------------------------------------
  m.def("sh_cpu_fwd", [](std::uintptr_t xyz, int64_t n, int degree, std::uintptr_t out,
                         const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::sh_cpu_fwd<T>(ptr<const T>(xyz), n, degree, ptr<T>(out), num_threads);
    });
  }, py::arg("xyz"), py::arg("n"), py::arg("degree"), py::arg("out"), py::arg("dtype"),
     py::arg("num_threads"));

  m.def("sh_cpu_bwd", [](std::uintptr_t xyz, std::uintptr_t grad_out, int64_t n, int degree,
                         std::uintptr_t grad_xyz, const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::sh_cpu_bwd<T>(ptr<const T>(xyz), ptr<const T>(grad_out), n, degree,
                             ptr<T>(grad_xyz), num_threads);
    });
  }, py::arg("xyz"), py::arg("grad_out"), py::arg("n"), py::arg("degree"), py::arg("grad_xyz"),
     py::arg("dtype"), py::arg("num_threads"));

  m.def("sh_cuda_fwd", [](std::uintptr_t xyz, int64_t n, int degree, std::uintptr_t out,
                          const std::string& dtype, std::uintptr_t stream) {
#ifdef LOCDIFF_WITH_CUDA
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::sh_cuda_fwd<T>(ptr<const T>(xyz), n, degree, ptr<T>(out),
                              reinterpret_cast<void*>(stream));
    });
#else
    (void)xyz, (void)n, (void)degree, (void)out, (void)dtype, (void)stream;
    no_cuda("spherical_harmonics");
#endif
  }, py::arg("xyz"), py::arg("n"), py::arg("degree"), py::arg("out"), py::arg("dtype"),
     py::arg("stream"));

  m.def("sh_cuda_bwd", [](std::uintptr_t xyz, std::uintptr_t grad_out, int64_t n, int degree,
                          std::uintptr_t grad_xyz, const std::string& dtype, std::uintptr_t stream) {
#ifdef LOCDIFF_WITH_CUDA
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::sh_cuda_bwd<T>(ptr<const T>(xyz), ptr<const T>(grad_out), n, degree,
                              ptr<T>(grad_xyz), reinterpret_cast<void*>(stream));
    });
#else
    (void)xyz, (void)grad_out, (void)n, (void)degree, (void)grad_xyz, (void)dtype, (void)stream;
    no_cuda("spherical_harmonics backward");
#endif
  }, py::arg("xyz"), py::arg("grad_out"), py::arg("n"), py::arg("degree"), py::arg("grad_xyz"),
     py::arg("dtype"), py::arg("stream"));

  // ---- SHDD decode and KL: see csrc/include/locdiff/shdd_kernels.h ----------------------
  // (bindings added below this line by the SHDD work)
}
