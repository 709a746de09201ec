// Thin pybind11 binding for the EVBMF / VBMF solvers: read the spectrum, release the GIL, solve.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "vbmf/vbmf_solver.h"

namespace py = pybind11;
using DoubleArray = py::array_t<double, py::array::c_style>;

namespace {

cpconv::VbmfSpectrum read_spectrum(const DoubleArray& singular_values, int64_t rows, int64_t cols,
                                   double frobenius_sq) {
    if (singular_values.ndim() != 1)
        throw std::invalid_argument("singular_values must be 1-D, got " + std::to_string(singular_values.ndim()) +
                                    " dimensions");
    return {singular_values.data(), static_cast<int64_t>(singular_values.shape(0)), rows, cols, frobenius_sq};
}

py::dict to_dict(cpconv::VbmfSolution&& s) {
    py::dict d;
    d["rank"] = s.rank;
    d["sigma2"] = s.sigma2;
    d["threshold"] = s.threshold;
    d["tau_bar"] = s.tau_bar;
    d["x_bar"] = s.x_bar;
    d["search_lower"] = s.search_lower;
    d["search_upper"] = s.search_upper;
    DoubleArray shrunk(static_cast<py::ssize_t>(s.shrunk.size()));
    std::copy(s.shrunk.begin(), s.shrunk.end(), shrunk.mutable_data());
    d["shrunk"] = shrunk;
    return d;
}

py::dict evbmf(const DoubleArray& singular_values, int64_t rows, int64_t cols, double frobenius_sq) {
    const cpconv::VbmfSpectrum spectrum = read_spectrum(singular_values, rows, cols, frobenius_sq);
    cpconv::VbmfSolution solution;
    {
        py::gil_scoped_release release;
        solution = cpconv::evbmf_solve(spectrum);
    }
    return to_dict(std::move(solution));
}

py::dict vbmf(const DoubleArray& singular_values, int64_t rows, int64_t cols, double frobenius_sq, double prior,
              double sigma2) {
    const cpconv::VbmfSpectrum spectrum = read_spectrum(singular_values, rows, cols, frobenius_sq);
    cpconv::VbmfSolution solution;
    {
        py::gil_scoped_release release;
        solution = cpconv::vbmf_solve(spectrum, prior, sigma2);
    }
    return to_dict(std::move(solution));
}

}  // namespace

void register_vbmf(py::module_& m) {
    m.def("evbmf", &evbmf, py::arg("singular_values").noconvert(), py::arg("rows"), py::arg("cols"),
          py::arg("frobenius_sq"),
          "EVBMF on a spectrum: float64 non-increasing singular values of an L x M matrix (L <= M), ||Y||_F^2. "
          "Returns a dict (rank, sigma2, threshold, tau_bar, x_bar, search_lower, search_upper, shrunk).");
    m.def("vbmf", &vbmf, py::arg("singular_values").noconvert(), py::arg("rows"), py::arg("cols"),
          py::arg("frobenius_sq"), py::arg("prior"), py::arg("sigma2"),
          "VBMF with known prior product c_a*c_b; sigma2 <= 0 estimates it by the EVB noise search.");
    m.def("tau_bar", &cpconv::evbmf_tau_bar, py::arg("alpha"),
          "Root tau > sqrt(alpha) of log(tau+1) + alpha*log(tau/alpha+1) - tau = 0.");
}
