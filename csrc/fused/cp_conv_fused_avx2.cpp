// The fused kernel for AVX2 + FMA (compiled with -mavx2 -mfma; only called when the CPU supports it).
// GEMM microkernel: 4 rows of A (broadcast) x up to 24 columns (3 ymm) of B, 12 accumulators; each
// packed panel of 8 rows is done as two halves. Column tails by masked loads/stores.
#include "fused/cp_conv_fused.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <ctime>

namespace cpconv::fused::avx2_impl {
namespace {

inline __m256i tail_mask(int64_t rem) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int n = rem >= 8 ? 8 : (rem <= 0 ? 0 : int(rem));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes);
}

// kMasked: the column block is narrower than 8*NV. Full blocks use plain loads and stores: a
// masked load (VMASKMOVPS) costs an extra uop and more latency on every k step.
template <int NV, bool kMasked>
inline void microkernel_4xNV(int64_t K, const float* __restrict a, const float* __restrict b, int64_t ldb,
                             float* __restrict c, int64_t ldc, int64_t mr, int64_t np,
                             const float* __restrict row_bias) {
    __m256 acc[4][NV];
    __m256i mask[NV];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
#pragma GCC unroll 3
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_setzero_ps();
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) mask[j] = tail_mask(np - 8 * j);
    for (int64_t k = 0; k < K; ++k) {
        __m256 bv[NV];
#pragma GCC unroll 3
        for (int j = 0; j < NV; ++j)
            bv[j] = kMasked ? _mm256_maskload_ps(b + k * ldb + 8 * j, mask[j]) : _mm256_loadu_ps(b + k * ldb + 8 * j);
        const float* ak = a + k * 8;  // panels are 8 rows wide; this kernel reads 4 of them
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
            const __m256 av = _mm256_broadcast_ss(ak + i);
#pragma GCC unroll 3
            for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        if (i >= mr) break;
        const __m256 bias = _mm256_set1_ps(row_bias ? row_bias[i] : 0.0f);
#pragma GCC unroll 3
        for (int j = 0; j < NV; ++j) {
            if (kMasked)
                _mm256_maskstore_ps(c + i * ldc + 8 * j, mask[j], _mm256_add_ps(acc[i][j], bias));
            else
                _mm256_storeu_ps(c + i * ldc + 8 * j, _mm256_add_ps(acc[i][j], bias));
        }
    }
}

// b_pack: null, or room for K x 48 floats: each column block of B is first copied there
// contiguously (for a B with a large row stride, e.g. image channels: fewer cache lines and TLB
// entries per k, and the block stays in L1 across all row panels of A).
void gemm_packed(int64_t M, int64_t P, int64_t K, const float* A, const float* B, int64_t ldb, float* C,
                 int64_t ldc, const float* row_bias, float* b_pack) {
    for (int64_t p0 = 0; p0 < P; p0 += 24) {
        const int64_t np = (P - p0) < 24 ? (P - p0) : 24;
        const float* b = B + p0;
        int64_t ldb_block = ldb;
        if (b_pack) {
            for (int64_t k = 0; k < K; ++k)
                for (int64_t i = 0; i < np; ++i) b_pack[k * 24 + i] = B[k * ldb + p0 + i];
            b = b_pack;
            ldb_block = 24;
        }
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mr = (M - m0) < 4 ? (M - m0) : 4;
            // Row m0 lives in panel m0 / 8 at offset m0 % 8.
            const float* a = A + (m0 / 8) * 8 * K + (m0 % 8);
            float* c = C + m0 * ldc + p0;
            const float* bias = row_bias ? row_bias + m0 : nullptr;
            if (np == 24)
                microkernel_4xNV<3, false>(K, a, b, ldb_block, c, ldc, mr, np, bias);
            else if (np > 16)
                microkernel_4xNV<3, true>(K, a, b, ldb_block, c, ldc, mr, np, bias);
            else if (np > 8)
                microkernel_4xNV<2, true>(K, a, b, ldb_block, c, ldc, mr, np, bias);
            else
                microkernel_4xNV<1, true>(K, a, b, ldb_block, c, ldc, mr, np, bias);
        }
    }
}

// For each of `rows` rows t: dst[t * ds + i] = sum_j coeff[j] * src[t * ss + i + offset[j]], i in
// [0, n); every read is inside the source. The tail mask is set up once for all rows.
void taps_rows(int64_t rows, int64_t n, int64_t taps, const float* __restrict coeff,
               const int64_t* __restrict offset, const float* __restrict src, int64_t ss, float* __restrict dst,
               int64_t ds) {
    const int64_t full = n / 8 * 8;
    const __m256i m = tail_mask(n - full);
    for (int64_t t = 0; t < rows; ++t) {
        const float* row = src + t * ss;
        float* out = dst + t * ds;
        for (int64_t i0 = 0; i0 < full; i0 += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = 0; j < taps; ++j)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(coeff[j]), _mm256_loadu_ps(row + i0 + offset[j]), acc);
            _mm256_storeu_ps(out + i0, acc);
        }
        if (full < n) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = 0; j < taps; ++j)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(coeff[j]), _mm256_maskload_ps(row + full + offset[j], m), acc);
            _mm256_maskstore_ps(out + full, m, acc);
        }
    }
}

#include "fused/cp_conv_fused_driver.inc"

}  // namespace
}  // namespace cpconv::fused::avx2_impl

void cpconv::fused::f32_cpconv_fused__avx2(const FusedProblem& p) { avx2_impl::run_problem(p); }

#else  // not x86: never selected (isa_supported() is false), but the symbol must exist.
#include <stdexcept>
void cpconv::fused::f32_cpconv_fused__avx2(const FusedProblem&) {
    throw std::runtime_error("the avx2 kernel is only built for x86");
}
#endif
