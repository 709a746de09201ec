// cpconv._core: creates one submodule per capability; the bindings live beside each capability.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_reference(py::module_& m);
void register_cp_als(py::module_& m);
void register_vbmf(py::module_& m);
void register_fused(py::module_& m);

PYBIND11_MODULE(_core, m) {
    m.doc() = "cpconv C++ core (torch-free kernels on raw float buffers)";
    auto reference = m.def_submodule("reference", "plain reference CP convolution");
    register_reference(reference);
    auto cp_als = m.def_submodule("cp_als", "CP-ALS decomposition of dense tensors");
    register_cp_als(cp_als);
    auto vbmf = m.def_submodule("vbmf", "EVBMF / VBMF analytic solvers");
    register_vbmf(vbmf);
    auto fused = m.def_submodule("fused", "fused CP convolution kernel");
    register_fused(fused);
}
