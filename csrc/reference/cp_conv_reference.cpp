#include "reference/cp_conv_reference.h"

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

namespace cpconv {

namespace {
void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(what);
}

// Every size and geometry value is at most this (int32's range, like torch's CPU convolutions), so
// the kernels' index arithmetic, done in int64, cannot overflow.
constexpr int64_t kMaxValue = (int64_t(1) << 31) - 1;
// Element counts of the input, output and intermediates must stay below this.
constexpr int64_t kMaxElements = int64_t(1) << 50;

void require_at_most(int64_t value, const char* name) {
    require(value <= kMaxValue, std::string(name) + "=" + std::to_string(value) + " is too large (at most " +
                                    std::to_string(kMaxValue) + ")");
}

// a * b * c ... with every factor >= 0, or -1 when the product exceeds kMaxElements.
int64_t bounded_product(std::initializer_list<int64_t> factors) {
    int64_t product = 1;
    for (int64_t f : factors) {
        if (f != 0 && product > kMaxElements / f) return -1;
        product *= f;
    }
    return product;
}
}  // namespace

CPConvShape make_cp_conv_shape(int64_t batch, int64_t in_channels, int64_t height, int64_t width,
                               int64_t out_channels, int64_t rank, int64_t groups, int64_t kernel_h,
                               int64_t kernel_w, IntPair stride, IntPair padding, IntPair dilation) {
    return CPConvShape{batch,         in_channels,   height,         width,          out_channels,
                       rank,          groups,        kernel_h,       kernel_w,       stride.first,
                       stride.second, padding.first, padding.second, dilation.first, dilation.second};
}

void validate_cp_conv_shape(const CPConvShape& s) {
    require(s.batch >= 1, "batch must be >= 1, got " + std::to_string(s.batch));
    require(s.in_channels >= 1, "in_channels must be >= 1, got " + std::to_string(s.in_channels));
    require(s.out_channels >= 1, "out_channels must be >= 1, got " + std::to_string(s.out_channels));
    require(s.rank >= 1, "rank must be >= 1, got " + std::to_string(s.rank));
    require(s.groups >= 1, "groups must be >= 1, got " + std::to_string(s.groups));
    require(s.in_channels % s.groups == 0 && s.out_channels % s.groups == 0 && s.rank % s.groups == 0,
            "in_channels, out_channels and rank must be divisible by groups=" +
                std::to_string(s.groups));
    require(s.kernel_h >= 1 && s.kernel_w >= 1, "kernel sizes must be >= 1");
    require(s.stride_h >= 1 && s.stride_w >= 1, "strides must be >= 1");
    require(s.dilation_h >= 1 && s.dilation_w >= 1, "dilations must be >= 1");
    require(s.pad_h >= 0 && s.pad_w >= 0, "paddings must be >= 0");
    require(s.height >= 1 && s.width >= 1, "input height and width must be >= 1");
    require_at_most(s.batch, "batch");
    require_at_most(s.in_channels, "in_channels");
    require_at_most(s.out_channels, "out_channels");
    require_at_most(s.rank, "rank");
    require_at_most(s.height, "height");
    require_at_most(s.width, "width");
    require_at_most(s.kernel_h, "kernel_h");
    require_at_most(s.kernel_w, "kernel_w");
    require_at_most(s.stride_h, "stride_h");
    require_at_most(s.stride_w, "stride_w");
    require_at_most(s.pad_h, "pad_h");
    require_at_most(s.pad_w, "pad_w");
    require_at_most(s.dilation_h, "dilation_h");
    require_at_most(s.dilation_w, "dilation_w");
    require(s.out_height() >= 1 && s.out_width() >= 1,
            "the (padded) input " + std::to_string(s.height) + "x" + std::to_string(s.width) +
                " is smaller than the dilated kernel");
    // The largest buffers: input, output, and the R-channel intermediates over the padded input.
    const int64_t padded_h = s.height + 2 * s.pad_h, padded_w = s.width + 2 * s.pad_w;
    require(bounded_product({s.batch, s.in_channels, s.height, s.width}) >= 0 &&
                bounded_product({s.batch, s.out_channels, s.out_height(), s.out_width()}) >= 0 &&
                bounded_product({s.rank, padded_h, padded_w}) >= 0,
            "the input, the output or the rank-" + std::to_string(s.rank) + " intermediates of a " +
                std::to_string(s.height) + "x" + std::to_string(s.width) + " input padded by (" +
                std::to_string(s.pad_h) + ", " + std::to_string(s.pad_w) + ") would hold more than 2^50 values");
}

void cp_conv2d_reference(const CPConvShape& s, const float* x, const float* in_factor,
                         const float* vert_factor, const float* horz_factor, const float* out_factor,
                         const float* bias, float* y) {
    validate_cp_conv_shape(s);
    const int64_t B = s.batch, C = s.in_channels, H = s.height, W = s.width;
    const int64_t N = s.out_channels, R = s.rank, G = s.groups;
    const int64_t Cg = C / G, Ng = N / G, Rg = R / G;
    const int64_t OH = s.out_height(), OW = s.out_width();

    std::vector<double> t1(static_cast<size_t>(R * H * W));    // stage 1: R x H x W
    std::vector<double> t2(static_cast<size_t>(R * OH * W));   // stage 2: R x OH x W
    std::vector<double> t3(static_cast<size_t>(R * OH * OW));  // stage 3: R x OH x OW

    for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * C * H * W;
        // Stage 1: grouped 1x1 conv, C -> R.
        for (int64_t r = 0; r < R; ++r) {
            const int64_t g = r / Rg;
            for (int64_t p = 0; p < H * W; ++p) {
                double acc = 0.0;
                for (int64_t c = 0; c < Cg; ++c)
                    acc += double(in_factor[c * R + r]) * double(xb[(g * Cg + c) * H * W + p]);
                t1[r * H * W + p] = acc;
            }
        }
        // Stage 2: depthwise kh x 1 along the height.
        for (int64_t r = 0; r < R; ++r)
            for (int64_t oh = 0; oh < OH; ++oh)
                for (int64_t w = 0; w < W; ++w) {
                    double acc = 0.0;
                    for (int64_t i = 0; i < s.kernel_h; ++i) {
                        const int64_t h = oh * s.stride_h - s.pad_h + i * s.dilation_h;
                        if (h < 0 || h >= H) continue;
                        acc += double(vert_factor[i * R + r]) * t1[(r * H + h) * W + w];
                    }
                    t2[(r * OH + oh) * W + w] = acc;
                }
        // Stage 3: depthwise 1 x kw along the width.
        for (int64_t r = 0; r < R; ++r)
            for (int64_t oh = 0; oh < OH; ++oh)
                for (int64_t ow = 0; ow < OW; ++ow) {
                    double acc = 0.0;
                    for (int64_t j = 0; j < s.kernel_w; ++j) {
                        const int64_t w = ow * s.stride_w - s.pad_w + j * s.dilation_w;
                        if (w < 0 || w >= W) continue;
                        acc += double(horz_factor[j * R + r]) * t2[(r * OH + oh) * W + w];
                    }
                    t3[(r * OH + oh) * OW + ow] = acc;
                }
        // Stage 4: grouped 1x1 conv, R -> N, plus bias.
        float* yb = y + b * N * OH * OW;
        for (int64_t n = 0; n < N; ++n) {
            const int64_t g = n / Ng;
            for (int64_t p = 0; p < OH * OW; ++p) {
                double acc = bias ? double(bias[n]) : 0.0;
                for (int64_t rl = 0; rl < Rg; ++rl)
                    acc += double(out_factor[n * Rg + rl]) * t3[(g * Rg + rl) * OH * OW + p];
                yb[n * OH * OW + p] = static_cast<float>(acc);
            }
        }
    }
}

}  // namespace cpconv
