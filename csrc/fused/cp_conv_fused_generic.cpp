// The fused kernel in portable C++ (baseline flags): the fallback for CPUs without AVX2, and the
// plain variant beside the optimised ones. GEMM microkernel: 4 rows x 8 columns of scalar
// accumulators, left to the compiler to vectorise with whatever the baseline offers.
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <ctime>

#include "fused/cp_conv_fused.h"

namespace cpconv::fused::generic_impl {
namespace {

// b_pack: null, or room for K x 48 floats: each column block of B is first copied there
// contiguously (for a B with a large row stride, e.g. image channels: fewer cache lines and TLB
// entries per k, and the block stays in L1 across all row panels of A).
void gemm_packed(int64_t M, int64_t P, int64_t K, const float* A, const float* B, int64_t ldb, float* C,
                 int64_t ldc, const float* row_bias, float* /*b_pack*/) {
    constexpr int64_t kCols = 8;
    for (int64_t p0 = 0; p0 < P; p0 += kCols) {
        const int64_t np = (P - p0) < kCols ? (P - p0) : kCols;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mr = (M - m0) < 4 ? (M - m0) : 4;
            const float* a = A + (m0 / 8) * 8 * K + (m0 % 8);
            float acc[4][kCols] = {};
            if (np == kCols) {
                for (int64_t k = 0; k < K; ++k) {
                    const float* bk = B + k * ldb + p0;
                    for (int i = 0; i < 4; ++i)
                        for (int j = 0; j < kCols; ++j) acc[i][j] += a[k * 8 + i] * bk[j];
                }
            } else {
                for (int64_t k = 0; k < K; ++k) {
                    const float* bk = B + k * ldb + p0;
                    for (int i = 0; i < 4; ++i)
                        for (int64_t j = 0; j < np; ++j) acc[i][j] += a[k * 8 + i] * bk[j];
                }
            }
            for (int64_t i = 0; i < mr; ++i) {
                const float bias = row_bias ? row_bias[m0 + i] : 0.0f;
                for (int64_t j = 0; j < np; ++j) C[(m0 + i) * ldc + p0 + j] = acc[i][j] + bias;
            }
        }
    }
}

// For each of `rows` rows t: dst[t * ds + i] = sum_j coeff[j] * src[t * ss + i + offset[j]], i in
// [0, n); every read is inside the source.
void taps_rows(int64_t rows, int64_t n, int64_t taps, const float* __restrict coeff,
               const int64_t* __restrict offset, const float* __restrict src, int64_t ss, float* __restrict dst,
               int64_t ds) {
    for (int64_t t = 0; t < rows; ++t) {
        const float* row = src + t * ss;
        float* __restrict out = dst + t * ds;
        for (int64_t i = 0; i < n; ++i) out[i] = 0.0f;
        for (int64_t j = 0; j < taps; ++j) {
            const float c = coeff[j];
            const float* __restrict s = row + offset[j];
            for (int64_t i = 0; i < n; ++i) out[i] += c * s[i];
        }
    }
}

#include "fused/cp_conv_fused_driver.inc"

}  // namespace
}  // namespace cpconv::fused::generic_impl

void cpconv::fused::f32_cpconv_fused__generic(const FusedProblem& p) { generic_impl::run_problem(p); }
