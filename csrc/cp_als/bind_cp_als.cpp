// Thin pybind11 bindings for CP-ALS: check shapes, copy the initial factors into the output arrays, read
// pointers, release the GIL, run. Validation of values (finite, dtype, rank limits) is in cpconv/cp_als.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cp_als/cp_als.h"

namespace py = pybind11;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

template <typename T>
std::vector<int64_t> shape_of(const Array<T>& x) {
    return std::vector<int64_t>(x.shape(), x.shape() + x.ndim());
}

template <typename T>
int64_t checked_rank(const std::vector<int64_t>& shape, const std::vector<Array<T>>& factors) {
    if (factors.size() != shape.size())
        throw std::invalid_argument("expected " + std::to_string(shape.size()) + " factors, got " +
                                    std::to_string(factors.size()));
    if (factors[0].ndim() != 2) throw std::invalid_argument("factors must be 2-D (mode size x rank)");
    const int64_t R = factors[0].shape(1);
    for (size_t n = 0; n < factors.size(); ++n) {
        const auto& f = factors[n];
        if (f.ndim() != 2 || f.shape(0) != shape[n] || f.shape(1) != R)
            throw std::invalid_argument("factor " + std::to_string(n) + " must have shape (" + std::to_string(shape[n]) +
                                        ", " + std::to_string(R) + ")");
    }
    return R;
}

template <typename T>
py::dict run_cp_als(const Array<T>& x, const std::vector<Array<T>>& init_factors, int64_t max_iter, double tol,
                    bool line_search, double l2_reg, int num_threads) {
    const std::vector<int64_t> shape = shape_of(x);
    const int64_t R = checked_rank(shape, init_factors);
    cpconv::validate_cp_als_problem(shape, R);
    py::list factors_out;
    std::vector<T*> factor_ptrs;
    for (size_t n = 0; n < shape.size(); ++n) {
        Array<T> f({shape[n], R});
        std::copy(init_factors[n].data(), init_factors[n].data() + shape[n] * R, f.mutable_data());
        factor_ptrs.push_back(f.mutable_data());
        factors_out.append(f);
    }
    Array<double> weights(R);
    cpconv::CPALSOptions options;
    options.max_iter = max_iter;
    options.tol = tol;
    options.line_search = line_search;
    options.l2_reg = l2_reg;
    options.num_threads = num_threads;
    const T* xp = x.data();
    double* wp = weights.mutable_data();
    cpconv::CPALSReport report;
    {
        py::gil_scoped_release release;
        report = cpconv::cp_als<T>(xp, shape, R, factor_ptrs, wp, options);
    }
    py::dict out;
    out["weights"] = weights;
    out["factors"] = factors_out;
    out["error_history"] = report.error_history;
    out["n_iter"] = report.n_iter;
    out["converged"] = report.converged;
    out["line_search_accepted"] = report.line_search_accepted;
    out["regularised_solves"] = report.regularised_solves;
    return out;
}

template <typename T>
Array<double> unfolding_gram(const Array<T>& x, int mode) {
    const std::vector<int64_t> shape = shape_of(x);
    if (mode < 0 || mode >= static_cast<int>(shape.size()))
        throw std::invalid_argument("mode must be in [0, " + std::to_string(shape.size()) + "), got " +
                                    std::to_string(mode));
    Array<double> gram({shape[mode], shape[mode]});
    const T* xp = x.data();
    double* gp = gram.mutable_data();
    {
        py::gil_scoped_release release;
        cpconv::unfolding_gram<T>(xp, shape, mode, gp);
    }
    return gram;
}

template <typename T>
double relative_error(const Array<T>& x, const Array<double>& weights, const std::vector<Array<T>>& factors,
                      int num_threads) {
    const std::vector<int64_t> shape = shape_of(x);
    const int64_t R = checked_rank(shape, factors);
    if (weights.ndim() != 1 || weights.shape(0) != R)
        throw std::invalid_argument("weights must have shape (" + std::to_string(R) + ",)");
    cpconv::validate_cp_als_problem(shape, R);
    std::vector<const T*> ptrs;
    for (const auto& f : factors) ptrs.push_back(f.data());
    const T* xp = x.data();
    const double* wp = weights.data();
    py::gil_scoped_release release;
    return cpconv::cp_relative_error<T>(xp, shape, R, ptrs, wp, num_threads);
}

template <typename T>
void define_for(py::module_& m) {
    m.def("cp_als", &run_cp_als<T>, py::arg("x").noconvert(), py::arg("init_factors"), py::arg("max_iter"),
          py::arg("tol"), py::arg("line_search"), py::arg("l2_reg"), py::arg("num_threads"),
          "CP-ALS from the given initial factors (C-contiguous, same dtype as x). Returns a dict with weights "
          "(float64), factors (unit columns), error_history, n_iter, converged, line_search_accepted, "
          "regularised_solves.");
    m.def("unfolding_gram", &unfolding_gram<T>, py::arg("x").noconvert(), py::arg("mode"),
          "Gram matrix X_(mode) X_(mode)^T (float64) of the mode unfolding.");
    m.def("relative_error", &relative_error<T>, py::arg("x").noconvert(), py::arg("weights").noconvert(),
          py::arg("factors"), py::arg("num_threads"),
          "||X - [[weights; factors]]|| / ||X|| by blocked explicit reconstruction.");
}

}  // namespace

void register_cp_als(py::module_& m) {
    define_for<float>(m);
    define_for<double>(m);
}
