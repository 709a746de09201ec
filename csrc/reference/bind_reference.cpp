// Thin pybind11 binding for the reference kernel: read shapes and pointers, release the GIL, call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "reference/cp_conv_reference.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style>;

namespace {

void check_dims(const FloatArray& a, py::ssize_t ndim, const char* name) {
    if (a.ndim() != ndim)
        throw std::invalid_argument(std::string(name) + " must have " + std::to_string(ndim) +
                                    " dimensions, got " + std::to_string(a.ndim()));
}

void check_dim(const FloatArray& a, int axis, int64_t expected, const char* name) {
    if (a.shape(axis) != expected)
        throw std::invalid_argument(std::string(name) + ".shape[" + std::to_string(axis) + "] must be " +
                                    std::to_string(expected) + ", got " + std::to_string(a.shape(axis)));
}

void cp_conv2d_reference(const FloatArray& x, const FloatArray& in_factor, const FloatArray& vert_factor,
                         const FloatArray& horz_factor, const FloatArray& out_factor,
                         std::optional<FloatArray> bias, FloatArray& y, std::pair<int64_t, int64_t> stride,
                         std::pair<int64_t, int64_t> padding, std::pair<int64_t, int64_t> dilation,
                         int64_t groups) {
    check_dims(x, 4, "x");
    check_dims(in_factor, 2, "in_factor");
    check_dims(vert_factor, 2, "vert_factor");
    check_dims(horz_factor, 2, "horz_factor");
    check_dims(out_factor, 2, "out_factor");
    check_dims(y, 4, "y");
    const cpconv::CPConvShape s = cpconv::make_cp_conv_shape(
        x.shape(0), x.shape(1), x.shape(2), x.shape(3), out_factor.shape(0), in_factor.shape(1), groups,
        vert_factor.shape(0), horz_factor.shape(0), stride, padding, dilation);
    cpconv::validate_cp_conv_shape(s);
    check_dim(in_factor, 0, s.in_channels / groups, "in_factor");
    check_dim(vert_factor, 1, s.rank, "vert_factor");
    check_dim(horz_factor, 1, s.rank, "horz_factor");
    check_dim(out_factor, 1, s.rank / groups, "out_factor");
    check_dim(y, 0, s.batch, "y");
    check_dim(y, 1, s.out_channels, "y");
    check_dim(y, 2, s.out_height(), "y");
    check_dim(y, 3, s.out_width(), "y");
    if (bias) {
        check_dims(*bias, 1, "bias");
        check_dim(*bias, 0, s.out_channels, "bias");
    }
    if (!y.writeable()) throw std::invalid_argument("y must be writeable");

    const float* xp = x.data();
    const float* sp = in_factor.data();
    const float* yp = vert_factor.data();
    const float* hp = horz_factor.data();
    const float* up = out_factor.data();
    const float* bp = bias ? bias->data() : nullptr;
    float* outp = y.mutable_data();
    py::gil_scoped_release release;
    cpconv::cp_conv2d_reference(s, xp, sp, yp, hp, up, bp, outp);
}

}  // namespace

void register_reference(py::module_& m) {
    m.def("cp_conv2d", &cp_conv2d_reference, py::arg("x").noconvert(), py::arg("in_factor").noconvert(),
          py::arg("vert_factor").noconvert(), py::arg("horz_factor").noconvert(),
          py::arg("out_factor").noconvert(), py::arg("bias").noconvert(), py::arg("y").noconvert(),
          py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"),
          "Reference CP convolution forward into the preallocated y (float32, C-contiguous, zero padding).");
}
