// Placeholder: the vbmf capability registers nothing yet.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_vbmf(py::module_& /*m*/) {}
