// locdiff._C: a thin pybind11 layer over the kernels. Pointers arrive as integers
// (tensor.data_ptr()), dtypes as the strings "float32" / "float64", CUDA streams as
// integers (torch.cuda.current_stream().cuda_stream). Validation happens in Python
// (python/locdiff/ops/); here only the dtype tag is dispatched. The GIL is released while
// kernels run so that other Python threads (data loaders) keep going.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "locdiff/output_pool.h"
#include "locdiff/sh_kernels.h"
#include "locdiff/shdd_kernels.h"

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

// A block of the output pool as a Python buffer (torch.frombuffer wraps it without a copy;
// the tensor's storage holds the block, which returns to the pool when the storage dies).
class PooledBlock {
 public:
  explicit PooledBlock(size_t bytes) : bytes_(bytes) { data_ = locdiff::output_pool::acquire(bytes, &capacity_); }
  ~PooledBlock() { locdiff::output_pool::release(data_, capacity_); }
  PooledBlock(const PooledBlock&) = delete;
  PooledBlock& operator=(const PooledBlock&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0, capacity_ = 0;
};

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

  m.def("sh_cpu_forward_path", [] { return std::string(locdiff::sh_cpu_forward_path()); },
        "The low-degree CPU forward in use: 'x86-64-v3' or 'portable' (LOCDIFF_CPU_PORTABLE=1).");

  m.def("sh_cpu_lanes_stream_bytes", [](const std::string& dtype) {
        int64_t bytes = 0;
        dispatch_float(dtype, [&](auto zero) { bytes = locdiff::sh_cpu_lanes_stream_bytes(int(sizeof(zero))); });
        return bytes;
      }, py::arg("dtype"),
        "From how many output bytes the mid-degree CPU forward streams (a quarter of the L3 in float64, half in float32).");

  // ---- CPU output pool (locdiff/output_pool.h) ----------------------------------------
  py::class_<PooledBlock>(m, "PooledBlock", py::buffer_protocol(),
                          "Writable bytes from the CPU output pool; returned to it when freed.")
      .def(py::init<size_t>(), py::arg("nbytes"))
      .def_buffer([](PooledBlock& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(b.bytes())}, {py::ssize_t(1)}, /*readonly=*/false);
      });
  m.def("output_pool_set_limit", [](size_t bytes) { locdiff::output_pool::set_limit(bytes); },
        py::arg("nbytes"));
  m.def("output_pool_limit", [] { return locdiff::output_pool::limit(); });
  m.def("output_pool_cached", [] { return locdiff::output_pool::cached(); },
        "Bytes held by the pool in blocks not in use.");

  // ---- spherical harmonics -------------------------------------------------------------
  m.def("sh_cpu_fwd", [](std::uintptr_t xyz, int64_t n, int degree, std::uintptr_t out,
                         const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    int64_t first_bad = -1;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      first_bad = locdiff::sh_cpu_fwd<T>(ptr<const T>(xyz), n, degree, ptr<T>(out), num_threads);
    });
    return first_bad;
  }, "Returns -1, or the first row of xyz that is non-finite or zero.", py::arg("xyz"), py::arg("n"), py::arg("degree"), py::arg("out"), py::arg("dtype"),
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
  // A ring grid arrives as (nlat, nlon, table, theta, log_area, lon0): float64 pointers.
  auto ring = [](int nlat, int nlon, std::uintptr_t table, std::uintptr_t theta,
                 std::uintptr_t log_area, double lon0) {
    locdiff::RingGrid g;
    g.nlat = nlat;
    g.nlon = nlon;
    g.table = ptr<const double>(table);
    g.theta = ptr<const double>(theta);
    g.log_area = ptr<const double>(log_area);
    g.lon0 = lon0;
    return g;
  };
#define LOCDIFF_GRID_ARGS int nlat, int nlon, std::uintptr_t table, std::uintptr_t theta, \
                          std::uintptr_t log_area, double lon0
#define LOCDIFF_GRID ring(nlat, nlon, table, theta, log_area, lon0)
#define LOCDIFF_GRID_PYARGS py::arg("nlat"), py::arg("nlon"), py::arg("table"), \
                            py::arg("theta"), py::arg("log_area"), py::arg("lon0")

  m.def("shdd_synth_cpu", [ring](std::uintptr_t coeffs, int64_t batch, int degree, LOCDIFF_GRID_ARGS,
                                 std::uintptr_t out, const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_synth_cpu<T>(ptr<const T>(coeffs), batch, degree, LOCDIFF_GRID, ptr<T>(out),
                                 num_threads);
    });
  }, py::arg("coeffs"), py::arg("batch"), py::arg("degree"), LOCDIFF_GRID_PYARGS, py::arg("out"),
     py::arg("dtype"), py::arg("num_threads"));

  m.def("shdd_adjoint_cpu", [ring](std::uintptr_t weights, int64_t batch, int degree,
                                   LOCDIFF_GRID_ARGS, std::uintptr_t out, const std::string& dtype,
                                   int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_adjoint_cpu<T>(ptr<const T>(weights), batch, degree, LOCDIFF_GRID, ptr<T>(out),
                                   num_threads);
    });
  }, py::arg("weights"), py::arg("batch"), py::arg("degree"), LOCDIFF_GRID_PYARGS, py::arg("out"),
     py::arg("dtype"), py::arg("num_threads"));

  m.def("shdd_candidates_cpu", [ring](std::uintptr_t coeffs, int64_t batch, int degree,
                                      LOCDIFF_GRID_ARGS, int ncand, std::uintptr_t index,
                                      std::uintptr_t value, std::uintptr_t start,
                                      const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_candidates_cpu<T>(ptr<const T>(coeffs), batch, degree, LOCDIFF_GRID, ncand,
                                      ptr<int64_t>(index), ptr<double>(value), ptr<double>(start),
                                      num_threads);
    });
  }, py::arg("coeffs"), py::arg("batch"), py::arg("degree"), LOCDIFF_GRID_PYARGS, py::arg("ncand"),
     py::arg("index"), py::arg("value"), py::arg("start"), py::arg("dtype"), py::arg("num_threads"));

  m.def("shdd_logz_cpu", [ring](std::uintptr_t coeffs, int64_t batch, int degree, LOCDIFF_GRID_ARGS,
                                double inv_temperature, std::uintptr_t out, const std::string& dtype,
                                int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_logz_cpu<T>(ptr<const T>(coeffs), batch, degree, LOCDIFF_GRID, inv_temperature,
                                ptr<double>(out), num_threads);
    });
  }, py::arg("coeffs"), py::arg("batch"), py::arg("degree"), LOCDIFF_GRID_PYARGS,
     py::arg("inv_temperature"), py::arg("out"), py::arg("dtype"), py::arg("num_threads"));

  m.def("shdd_kl_fwd_cpu", [ring](std::uintptr_t pred, std::uintptr_t target, int64_t batch,
                                  int degree, LOCDIFF_GRID_ARGS, double inv_temperature,
                                  std::uintptr_t kl, const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_kl_fwd_cpu<T>(ptr<const T>(pred), ptr<const T>(target), batch, degree,
                                  LOCDIFF_GRID, inv_temperature, ptr<T>(kl), num_threads);
    });
  }, py::arg("pred"), py::arg("target"), py::arg("batch"), py::arg("degree"), LOCDIFF_GRID_PYARGS,
     py::arg("inv_temperature"), py::arg("kl"), py::arg("dtype"), py::arg("num_threads"));

  m.def("shdd_kl_bwd_cpu", [ring](std::uintptr_t pred, std::uintptr_t target, std::uintptr_t grad_kl,
                                  int64_t batch, int degree, LOCDIFF_GRID_ARGS,
                                  double inv_temperature, std::uintptr_t grad_pred,
                                  std::uintptr_t grad_target, const std::string& dtype,
                                  int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_kl_bwd_cpu<T>(ptr<const T>(pred), ptr<const T>(target), ptr<const T>(grad_kl),
                                  batch, degree, LOCDIFF_GRID, inv_temperature, ptr<T>(grad_pred),
                                  ptr<T>(grad_target), num_threads);
    });
  }, py::arg("pred"), py::arg("target"), py::arg("grad_kl"), py::arg("batch"), py::arg("degree"),
     LOCDIFF_GRID_PYARGS, py::arg("inv_temperature"), py::arg("grad_pred"), py::arg("grad_target"),
     py::arg("dtype"), py::arg("num_threads"));

  m.def("shdd_kl_grad_cpu", [ring](std::uintptr_t pred, std::uintptr_t target, int64_t batch, int degree,
                                   LOCDIFF_GRID_ARGS, double inv_temperature, std::uintptr_t kl,
                                   std::uintptr_t grad_pred, std::uintptr_t grad_target,
                                   const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_kl_grad_cpu<T>(ptr<const T>(pred), ptr<const T>(target), batch, degree, LOCDIFF_GRID,
                                   inv_temperature, ptr<T>(kl), ptr<T>(grad_pred), ptr<T>(grad_target),
                                   num_threads);
    });
  }, "KL and its gradients w.r.t. pred and target at grad_kl = 1 (0: not wanted).", py::arg("pred"),
     py::arg("target"), py::arg("batch"), py::arg("degree"), LOCDIFF_GRID_PYARGS, py::arg("inv_temperature"),
     py::arg("kl"), py::arg("grad_pred"), py::arg("grad_target"), py::arg("dtype"), py::arg("num_threads"));

  m.def("shdd_legendre_table_cpu", [](std::uintptr_t theta, int nhalf, int degree, std::uintptr_t out,
                                      int num_threads) {
    py::gil_scoped_release nogil;
    locdiff::shdd_legendre_table_cpu(ptr<const double>(theta), nhalf, degree, ptr<double>(out),
                                     num_threads);
  }, py::arg("theta"), py::arg("nhalf"), py::arg("degree"), py::arg("out"), py::arg("num_threads"));

  // xyz (N, 3) float64, row (N,) int64; value (N,) and grad (N, 3) float64 (grad may be 0).
  m.def("shdd_eval_cpu", [](std::uintptr_t coeffs, int degree, std::uintptr_t xyz,
                            std::uintptr_t row, int64_t n, std::uintptr_t value,
                            std::uintptr_t grad, const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_eval_cpu<T>(ptr<const T>(coeffs), degree, ptr<const double>(xyz),
                                ptr<const int64_t>(row), n, ptr<double>(value), ptr<double>(grad),
                                num_threads);
    });
  }, py::arg("coeffs"), py::arg("degree"), py::arg("xyz"), py::arg("row"), py::arg("n"),
     py::arg("value"), py::arg("grad"), py::arg("dtype"), py::arg("num_threads"));

  // xyz (N, 3) float64, row (N,) int64; hess (N, 3, 3) float64.
  m.def("shdd_hessian_cpu", [](std::uintptr_t coeffs, int degree, std::uintptr_t xyz,
                               std::uintptr_t row, int64_t n, std::uintptr_t hess,
                               const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_hessian_cpu<T>(ptr<const T>(coeffs), degree, ptr<const double>(xyz),
                                   ptr<const int64_t>(row), n, ptr<double>(hess), num_threads);
    });
  }, py::arg("coeffs"), py::arg("degree"), py::arg("xyz"), py::arg("row"), py::arg("n"),
     py::arg("hess"), py::arg("dtype"), py::arg("num_threads"));

  m.def("shdd_scan_cpu", [ring](std::uintptr_t f, int64_t batch, LOCDIFF_GRID_ARGS, bool folded,
                                 int ncand, std::uintptr_t index, std::uintptr_t value,
                                 std::uintptr_t start, const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_scan_cpu<T>(ptr<const T>(f), batch, LOCDIFF_GRID, folded, ncand,
                                ptr<int64_t>(index), ptr<double>(value), ptr<double>(start),
                                num_threads);
    });
  }, py::arg("f"), py::arg("batch"), LOCDIFF_GRID_PYARGS, py::arg("folded"), py::arg("ncand"),
     py::arg("index"), py::arg("value"), py::arg("start"), py::arg("dtype"), py::arg("num_threads"));

  // xyz (N, 3) float64 starts, overwritten; value (N,) float64; row (N,) int64.
  m.def("shdd_refine_cpu", [](std::uintptr_t coeffs, int degree, double radius, std::uintptr_t row,
                              int64_t n, int max_iter, std::uintptr_t xyz, std::uintptr_t value,
                              const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_refine_cpu<T>(ptr<const T>(coeffs), degree, radius, ptr<const int64_t>(row), n,
                                  max_iter, ptr<double>(xyz), ptr<double>(value), num_threads);
    });
  }, py::arg("coeffs"), py::arg("degree"), py::arg("radius"), py::arg("row"), py::arg("n"),
     py::arg("max_iter"), py::arg("xyz"), py::arg("value"), py::arg("dtype"), py::arg("num_threads"));

  // cand_value (B, ncand), cand_start (B, ncand, 2) float64; out xyz (B, ncand, 3), value (B, ncand).
  m.def("shdd_decode_refine_cpu", [](std::uintptr_t coeffs, int64_t batch, int degree, double radius,
                                     int ncand, std::uintptr_t cand_value, std::uintptr_t cand_start,
                                     int nrefine, int max_iter, std::uintptr_t xyz, std::uintptr_t value,
                                     const std::string& dtype, int num_threads) {
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_decode_refine_cpu<T>(ptr<const T>(coeffs), batch, degree, radius, ncand,
                                         ptr<const double>(cand_value), ptr<const double>(cand_start),
                                         nrefine, max_iter, ptr<double>(xyz), ptr<double>(value),
                                         num_threads);
    });
  }, py::arg("coeffs"), py::arg("batch"), py::arg("degree"), py::arg("radius"), py::arg("ncand"),
     py::arg("cand_value"), py::arg("cand_start"), py::arg("nrefine"), py::arg("max_iter"),
     py::arg("xyz"), py::arg("value"), py::arg("dtype"), py::arg("num_threads"));

  m.def("shdd_kl_fwd_cuda", [ring](std::uintptr_t pred, std::uintptr_t target, int64_t batch,
                                   int degree, LOCDIFF_GRID_ARGS, double inv_temperature,
                                   std::uintptr_t kl, const std::string& dtype, std::uintptr_t stream) {
#ifdef LOCDIFF_WITH_CUDA
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_kl_fwd_cuda<T>(ptr<const T>(pred), ptr<const T>(target), batch, degree,
                                   LOCDIFF_GRID, inv_temperature, ptr<T>(kl),
                                   reinterpret_cast<void*>(stream));
    });
#else
    (void)ring, (void)pred, (void)target, (void)batch, (void)degree, (void)nlat, (void)nlon,
        (void)table, (void)theta, (void)log_area, (void)lon0, (void)inv_temperature, (void)kl,
        (void)dtype, (void)stream;
    no_cuda("shdd_kl");
#endif
  }, py::arg("pred"), py::arg("target"), py::arg("batch"), py::arg("degree"), LOCDIFF_GRID_PYARGS,
     py::arg("inv_temperature"), py::arg("kl"), py::arg("dtype"), py::arg("stream"));

  m.def("shdd_kl_bwd_cuda", [ring](std::uintptr_t pred, std::uintptr_t target, std::uintptr_t grad_kl,
                                   int64_t batch, int degree, LOCDIFF_GRID_ARGS,
                                   double inv_temperature, std::uintptr_t grad_pred,
                                   std::uintptr_t grad_target, const std::string& dtype,
                                   std::uintptr_t stream) {
#ifdef LOCDIFF_WITH_CUDA
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_kl_bwd_cuda<T>(ptr<const T>(pred), ptr<const T>(target), ptr<const T>(grad_kl),
                                   batch, degree, LOCDIFF_GRID, inv_temperature, ptr<T>(grad_pred),
                                   ptr<T>(grad_target), reinterpret_cast<void*>(stream));
    });
#else
    (void)ring, (void)pred, (void)target, (void)grad_kl, (void)batch, (void)degree, (void)nlat,
        (void)nlon, (void)table, (void)theta, (void)log_area, (void)lon0, (void)inv_temperature,
        (void)grad_pred, (void)grad_target, (void)dtype, (void)stream;
    no_cuda("shdd_kl backward");
#endif
  }, py::arg("pred"), py::arg("target"), py::arg("grad_kl"), py::arg("batch"), py::arg("degree"),
     LOCDIFF_GRID_PYARGS, py::arg("inv_temperature"), py::arg("grad_pred"), py::arg("grad_target"),
     py::arg("dtype"), py::arg("stream"));

  m.def("shdd_synth_cuda", [ring](std::uintptr_t coeffs, int64_t batch, int degree, LOCDIFF_GRID_ARGS,
                                  std::uintptr_t out, const std::string& dtype, std::uintptr_t stream) {
#ifdef LOCDIFF_WITH_CUDA
    py::gil_scoped_release nogil;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      locdiff::shdd_synth_cuda<T>(ptr<const T>(coeffs), batch, degree, LOCDIFF_GRID, ptr<T>(out),
                                  reinterpret_cast<void*>(stream));
    });
#else
    (void)ring, (void)coeffs, (void)batch, (void)degree, (void)nlat, (void)nlon, (void)table,
        (void)theta, (void)log_area, (void)lon0, (void)out, (void)dtype, (void)stream;
    no_cuda("shdd grid synthesis");
#endif
  }, py::arg("coeffs"), py::arg("batch"), py::arg("degree"), LOCDIFF_GRID_PYARGS, py::arg("out"),
     py::arg("dtype"), py::arg("stream"));
#undef LOCDIFF_GRID_ARGS
#undef LOCDIFF_GRID
#undef LOCDIFF_GRID_PYARGS
}
