// Placeholder: the fused capability registers nothing yet.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_fused(py::module_& /*m*/) {}
