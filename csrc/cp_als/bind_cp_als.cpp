// Placeholder: the cp_als capability registers nothing yet.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_cp_als(py::module_& /*m*/) {}
