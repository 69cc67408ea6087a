// locdiff._C: a thin pybind11 layer over the kernels. Every kernel is bound by one helper
// under the name <op>_<device>[_bwd]; pointers arrive as integers (tensor.data_ptr()), a
// ring grid as the tuple (nlat, nlon, table, theta, log_area, lon0, one_mode_per_polar_ring), CUDA streams as
// integers, and the dtype tag "float32" / "float64" last. Validation happens in Python
// (python/locdiff/ops/). The GIL is released while kernels run so that other Python
// threads (data loaders) keep going.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

#include "locdiff/output_pool.h"
#include "locdiff/sh_kernels.h"
#include "locdiff/shdd_kernels.h"

namespace py = pybind11;

namespace {

// How a kernel parameter of type P arrives from Python, and its conversion.
template <typename P>
struct Arg {
  using type = P;
  static P get(P v) { return v; }
};
template <typename P>
struct Arg<P*> {
  using type = std::uintptr_t;
  static P* get(std::uintptr_t address) { return reinterpret_cast<P*>(address); }
};
using GridTuple = std::tuple<int, int, std::uintptr_t, std::uintptr_t, std::uintptr_t, double, bool>;
template <>
struct Arg<const locdiff::RingGrid&> {
  using type = GridTuple;
  static locdiff::RingGrid get(const GridTuple& t) {
    locdiff::RingGrid g;
    g.nlat = std::get<0>(t);
    g.nlon = std::get<1>(t);
    g.table = reinterpret_cast<const double*>(std::get<2>(t));
    g.theta = reinterpret_cast<const double*>(std::get<3>(t));
    g.log_area = reinterpret_cast<const double*>(std::get<4>(t));
    g.lon0 = std::get<5>(t);
    g.one_mode_per_polar_ring = std::get<6>(t);
    return g;
  }
};

std::string binding_name(const char* op, const char* device, bool bwd) {
  return std::string(op) + "_" + device + (bwd ? "_bwd" : "");
}

// Binds a kernel with float32 and float64 instantiations as <op>_<device>[_bwd](*args, dtype).
template <typename R, typename... A32, typename... A64>
void def_kernel(py::module_& m, const char* op, const char* device, R (*k32)(A32...), R (*k64)(A64...),
                bool bwd = false, const char* doc = "") {
  static_assert(sizeof...(A32) == sizeof...(A64), "float32 and float64 kernels differ in arity");
  m.def(binding_name(op, device, bwd).c_str(), [k32, k64](typename Arg<A32>::type... a, const std::string& dtype) -> R {
    py::gil_scoped_release nogil;
    if (dtype == "float32") return k32(Arg<A32>::get(a)...);
    if (dtype == "float64") return k64(Arg<A64>::get(a)...);
    throw std::invalid_argument("locdiff._C: dtype must be 'float32' or 'float64', got '" + dtype + "'");
  }, doc);
}

// Binds a kernel of one fixed type as <op>_<device>(*args).
template <typename R, typename... A>
void def_fixed(py::module_& m, const char* op, const char* device, R (*k)(A...), const char* doc = "") {
  m.def(binding_name(op, device, false).c_str(), [k](typename Arg<A>::type... a) -> R {
    py::gil_scoped_release nogil;
    return k(Arg<A>::get(a)...);
  }, doc);
}

// The binding of a CUDA kernel in a build without CUDA: the same name, a clear error.
[[maybe_unused]] void def_missing_cuda(py::module_& m, const char* op, bool bwd = false) {
  const std::string name = binding_name(op, "cuda", bwd);
  m.def(name.c_str(), [name](py::args, py::kwargs) {
    throw std::runtime_error("locdiff was built without CUDA, so " + name +
                             " cannot run on a CUDA tensor; rebuild with nvcc on PATH "
                             "(LOCDIFF_CUDA=ON makes a missing nvcc a build error)");
  });
}

#define LOCDIFF_KERNEL(m, op, device, fn, ...) def_kernel(m, op, device, &fn<float>, &fn<double>, ##__VA_ARGS__)
#ifdef LOCDIFF_WITH_CUDA
#define LOCDIFF_CUDA_KERNEL(m, op, fn, ...) LOCDIFF_KERNEL(m, op, "cuda", fn, ##__VA_ARGS__)
#else
#define LOCDIFF_CUDA_KERNEL(m, op, fn, bwd...) def_missing_cuda(m, op, ##bwd)
#endif

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
  using namespace locdiff;
  m.doc() = "locdiff compiled kernels (CPU always, CUDA when built with nvcc)";

  m.def("has_cuda", [] {
#ifdef LOCDIFF_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when this build contains the CUDA kernels.");

  m.def("sh_cpu_forward_path", [] { return std::string(sh_cpu_forward_path()); },
        "The low-degree CPU forward in use: 'x86-64-v3' or 'portable' (LOCDIFF_CPU_PORTABLE=1).");
  m.def("sh_cpu_lanes_stream_bytes", [](const std::string& dtype) {
        if (dtype != "float32" && dtype != "float64")
          throw std::invalid_argument("locdiff._C: dtype must be 'float32' or 'float64', got '" + dtype + "'");
        return sh_cpu_lanes_stream_bytes(dtype == "float32" ? 4 : 8);
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
  m.def("output_pool_set_limit", [](size_t bytes) { output_pool::set_limit(bytes); }, py::arg("nbytes"));
  m.def("output_pool_limit", [] { return output_pool::limit(); });
  m.def("output_pool_cached", [] { return output_pool::cached(); },
        "Bytes held by the pool in blocks not in use.");

  // ---- kernels: signatures in locdiff/sh_kernels.h and locdiff/shdd_kernels.h ----------
  LOCDIFF_KERNEL(m, "sh", "cpu", sh_cpu_fwd, false,
                 "Returns -1, or the first row of xyz that is non-finite or zero.");
  LOCDIFF_KERNEL(m, "sh", "cpu", sh_cpu_bwd, true);
  LOCDIFF_CUDA_KERNEL(m, "sh", sh_cuda_fwd);
  LOCDIFF_CUDA_KERNEL(m, "sh", sh_cuda_bwd, true);

  LOCDIFF_KERNEL(m, "shdd_synth", "cpu", shdd_synth_cpu);
  LOCDIFF_CUDA_KERNEL(m, "shdd_synth", shdd_synth_cuda);
  LOCDIFF_KERNEL(m, "shdd_adjoint", "cpu", shdd_adjoint_cpu);
  LOCDIFF_CUDA_KERNEL(m, "shdd_adjoint", shdd_adjoint_cuda);
  LOCDIFF_KERNEL(m, "shdd_kl", "cpu", shdd_kl_fwd_cpu);
  LOCDIFF_KERNEL(m, "shdd_kl", "cpu", shdd_kl_bwd_cpu, true);
  LOCDIFF_CUDA_KERNEL(m, "shdd_kl", shdd_kl_fwd_cuda);
  LOCDIFF_CUDA_KERNEL(m, "shdd_kl", shdd_kl_bwd_cuda, true);
  LOCDIFF_KERNEL(m, "shdd_kl_grad", "cpu", shdd_kl_grad_cpu, false,
                 "KL and its gradients w.r.t. pred and target at grad_kl = 1 (0: not wanted).");
  LOCDIFF_KERNEL(m, "shdd_candidates", "cpu", shdd_candidates_cpu);
  LOCDIFF_KERNEL(m, "shdd_scan", "cpu", shdd_scan_cpu);
  LOCDIFF_KERNEL(m, "shdd_logz", "cpu", shdd_logz_cpu);
  LOCDIFF_KERNEL(m, "shdd_eval", "cpu", shdd_eval_cpu);
  LOCDIFF_KERNEL(m, "shdd_hessian", "cpu", shdd_hessian_cpu);
  LOCDIFF_KERNEL(m, "shdd_refine", "cpu", shdd_refine_cpu);
  LOCDIFF_KERNEL(m, "shdd_decode_refine", "cpu", shdd_decode_refine_cpu);
  def_fixed(m, "shdd_legendre_table", "cpu", &shdd_legendre_table_cpu);
}
