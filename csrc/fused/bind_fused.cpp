// Thin pybind11 bindings of the fused kernel: read shapes and pointers, release the GIL, call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "fused/cp_conv_fused.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style>;
using cpconv::fused::Isa;
using cpconv::fused::PackedWeights;

namespace {

void check_shape(const FloatArray& a, std::vector<int64_t> expected, const char* name) {
    bool ok = a.ndim() == py::ssize_t(expected.size());
    for (size_t i = 0; ok && i < expected.size(); ++i) ok = a.shape(i) == expected[i];
    if (!ok) {
        std::string got, want;
        for (py::ssize_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
        for (size_t i = 0; i < expected.size(); ++i) want += (i ? ", " : "") + std::to_string(expected[i]);
        throw std::invalid_argument(std::string(name) + " must have shape (" + want + "), got (" + got + ")");
    }
}

PackedWeights pack(const FloatArray& in_factor, const FloatArray& vert_factor, const FloatArray& horz_factor,
                   const FloatArray& out_factor, std::optional<FloatArray> bias, int64_t groups) {
    if (in_factor.ndim() != 2 || vert_factor.ndim() != 2 || horz_factor.ndim() != 2 || out_factor.ndim() != 2)
        throw std::invalid_argument("the factors must be matrices");
    if (groups < 1) throw std::invalid_argument("groups must be >= 1, got " + std::to_string(groups));
    const int64_t rank = in_factor.shape(1), in_channels = in_factor.shape(0) * groups;
    const int64_t out_channels = out_factor.shape(0);
    const int64_t kh = vert_factor.shape(0), kw = horz_factor.shape(0);
    if (rank % groups)
        throw std::invalid_argument("rank=" + std::to_string(rank) + " must be divisible by groups=" +
                                    std::to_string(groups));
    check_shape(vert_factor, {kh, rank}, "vert_factor");
    check_shape(horz_factor, {kw, rank}, "horz_factor");
    check_shape(out_factor, {out_channels, rank / groups}, "out_factor");
    if (bias) check_shape(*bias, {out_channels}, "bias");
    const float* sp = in_factor.data();
    const float* yp = vert_factor.data();
    const float* xp = horz_factor.data();
    const float* up = out_factor.data();
    const float* bp = bias ? bias->data() : nullptr;
    py::gil_scoped_release release;
    return cpconv::fused::pack_weights(out_channels, in_channels, rank, groups, kh, kw, sp, yp, xp, up, bp);
}

Isa resolve_isa(const std::string& name) {
    if (name == "auto") return cpconv::fused::best_isa();
    const Isa isa = cpconv::fused::isa_from_name(name);
    if (!cpconv::fused::isa_supported(isa))
        throw std::invalid_argument("instruction set '" + name + "' is not supported by this CPU");
    return isa;
}

// The problem shape of input x on packed weights w; throws std::invalid_argument on a mismatch.
cpconv::CPConvShape checked_shape(const py::array& x, const PackedWeights& w, std::pair<int64_t, int64_t> stride,
                                  std::pair<int64_t, int64_t> padding, std::pair<int64_t, int64_t> dilation) {
    if (x.ndim() != 4) throw std::invalid_argument("x must be 4-D (B, C, H, W), got " + std::to_string(x.ndim()) + "-D");
    const cpconv::CPConvShape s = cpconv::make_cp_conv_shape(
        x.shape(0), x.shape(1), x.shape(2), x.shape(3), w.out_channels, w.rank, w.groups, w.kernel_h, w.kernel_w,
        stride, padding, dilation);
    if (s.in_channels != w.in_channels)
        throw std::invalid_argument("x has " + std::to_string(s.in_channels) + " channels, the weights expect " +
                                    std::to_string(w.in_channels));
    cpconv::validate_cp_conv_shape(s);
    return s;
}

py::object cp_conv2d(const FloatArray& x, const PackedWeights& w, FloatArray& y, std::pair<int64_t, int64_t> stride,
                     std::pair<int64_t, int64_t> padding, std::pair<int64_t, int64_t> dilation, int threads,
                     const std::string& isa_name, bool profile) {
    const cpconv::CPConvShape s = checked_shape(x, w, stride, padding, dilation);
    check_shape(y, {s.batch, s.out_channels, s.out_height(), s.out_width()}, "y");
    if (!y.writeable()) throw std::invalid_argument("y must be writeable");
    if (threads < 1) throw std::invalid_argument("threads must be >= 1, got " + std::to_string(threads));
    const Isa isa = resolve_isa(isa_name);
    const float* xp = x.data();
    float* yp = y.mutable_data();
    double seconds[4] = {0, 0, 0, 0};
    {
        py::gil_scoped_release release;
        cpconv::fused::run_fused(s, xp, w, yp, threads, isa, profile ? seconds : nullptr);
    }
    if (!profile) return py::none();
    return py::make_tuple(seconds[0], seconds[1] + seconds[2], seconds[3]);
}

// The eager layer's call: x must be float32 (TypeError otherwise), any strides (a non-C-contiguous
// array, e.g. a channels_last tensor's view, is copied); the output is a new C-contiguous array. One
// Python-level hop that also does the checks the caller would otherwise make one torch call each for.
py::array_t<float> forward(const py::array& x_any, const PackedWeights& w, std::pair<int64_t, int64_t> stride,
                           std::pair<int64_t, int64_t> padding, std::pair<int64_t, int64_t> dilation, int threads) {
    if (!x_any.dtype().is(py::dtype::of<float>()))
        throw py::type_error("x must be a float32 array, got " + std::string(py::str(x_any.dtype())));
    const auto x = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(x_any);
    if (!x) throw py::error_already_set();
    const cpconv::CPConvShape s = checked_shape(x, w, stride, padding, dilation);
    if (threads < 1) throw std::invalid_argument("threads must be >= 1, got " + std::to_string(threads));
    py::array_t<float> y({s.batch, s.out_channels, s.out_height(), s.out_width()});
    const float* xp = x.data();
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release release;
        cpconv::fused::run_fused(s, xp, w, yp, threads, cpconv::fused::best_isa());
    }
    return y;
}

}  // namespace

void register_fused(py::module_& m) {
    py::class_<PackedWeights>(m, "PackedWeights",
                              "CP factors packed for the fused kernel (opaque; made by pack()).")
        .def_readonly("out_channels", &PackedWeights::out_channels)
        .def_readonly("in_channels", &PackedWeights::in_channels)
        .def_readonly("rank", &PackedWeights::rank)
        .def_readonly("groups", &PackedWeights::groups)
        .def_readonly("kernel_h", &PackedWeights::kernel_h)
        .def_readonly("kernel_w", &PackedWeights::kernel_w)
        .def_readonly("has_bias", &PackedWeights::has_bias)
        .def_property_readonly("nbytes", [](const PackedWeights& w) { return w.data.size() * sizeof(float); });
    m.def("pack", &pack, py::arg("in_factor").noconvert(), py::arg("vert_factor").noconvert(),
          py::arg("horz_factor").noconvert(), py::arg("out_factor").noconvert(), py::arg("bias").noconvert(),
          py::arg("groups"), "Pack S (C/G x R), Y (kh x R), X (kw x R), U (N x R/G), bias (N) or None.");
    m.def("cp_conv2d", &cp_conv2d, py::arg("x").noconvert(), py::arg("packed"), py::arg("y").noconvert(),
          py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("threads"), py::arg("isa"),
          py::arg("profile") = false,
          "Fused CP convolution into the preallocated y (float32, C-contiguous, zero padding). isa: 'auto', "
          "'avx512', 'avx2' or 'generic'. With profile=True returns the seconds of (stage 1, stages 2+3, stage 4), thread CPU time summed over threads.");
    m.def("forward", &forward, py::arg("x"), py::arg("packed"), py::arg("stride"), py::arg("padding"),
          py::arg("dilation"), py::arg("threads"),
          "Fused CP convolution (best instruction set) into a new C-contiguous (B, N, OH, OW) float32 array. x "
          "must be float32 (TypeError otherwise); a non-C-contiguous x is copied.");
    m.def("best_isa", []() { return std::string(cpconv::fused::isa_name(cpconv::fused::best_isa())); },
          "The instruction set 'auto' selects on this CPU.");
    m.def("ran_multithreaded", &cpconv::fused::ran_multithreaded,
          "True once a call in this process ran with several OpenMP threads.");
    m.def("supported_isas", []() {
        std::vector<std::string> out;
        for (Isa isa : {Isa::avx512, Isa::avx2, Isa::generic})
            if (cpconv::fused::isa_supported(isa)) out.emplace_back(cpconv::fused::isa_name(isa));
        return out;
    }, "The instruction sets this CPU supports, best first.");
}
