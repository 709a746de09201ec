// Plain, obviously-correct CP convolution forward. It is the reference the optimised kernels are
// tested against, so it runs the four stages literally, one after another, with double accumulators.
#pragma once
#include <cstdint>
#include <utility>

namespace cpconv {

// Geometry of one CP convolution. Factor layouts (row-major, "r" is the global rank index):
//   in_factor   S: (C/G) x R      stage 1, grouped 1x1 conv C -> R (rank r belongs to group r / (R/G))
//   vert_factor Y: kh x R         stage 2, depthwise kh x 1 (stride_h, pad_h, dilation_h)
//   horz_factor X: kw x R         stage 3, depthwise 1 x kw (stride_w, pad_w, dilation_w)
//   out_factor  U: N x (R/G)      stage 4, grouped 1x1 conv R -> N, plus bias (may be null)
// Input  x: B x C x H x W, output y: B x N x OH x OW (both NCHW, contiguous).
struct CPConvShape {
    int64_t batch, in_channels, height, width;
    int64_t out_channels, rank, groups;
    int64_t kernel_h, kernel_w;
    int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;

    int64_t out_height() const {
        return (height + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1;
    }
    int64_t out_width() const {
        return (width + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1;
    }
};

using IntPair = std::pair<int64_t, int64_t>;

// The shape of one call from the input's NCHW sizes, the factor sizes and the geometry (not validated).
// Defined out of line (baseline ISA): per-ISA kernel units include this header.
CPConvShape make_cp_conv_shape(int64_t batch, int64_t in_channels, int64_t height, int64_t width,
                               int64_t out_channels, int64_t rank, int64_t groups, int64_t kernel_h,
                               int64_t kernel_w, IntPair stride, IntPair padding, IntPair dilation);

// Throws std::invalid_argument naming the offending value when the shape is not valid.
void validate_cp_conv_shape(const CPConvShape& s);

void cp_conv2d_reference(const CPConvShape& s, const float* x, const float* in_factor,
                         const float* vert_factor, const float* horz_factor, const float* out_factor,
                         const float* bias, float* y);

}  // namespace cpconv
