// The fused kernel for AVX-512 (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma; only
// called when the CPU supports it). GEMM microkernel: 8 rows of A (broadcast) x up to 48 columns
// (3 zmm) of B, 24 accumulators; column tails by masked loads/stores.
#include "fused/cp_conv_fused.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <ctime>

namespace cpconv::fused::avx512_impl {
namespace {

// Output lines to prefetch for writing (PREFETCHW), one per k step of the K loop so they never
// crowd the line-fill buffers: `count` lines, `per_row` consecutive lines in each row of stride `ld`.
// The tiles' destinations (the layer's output for stage 4, the band buffer for stage 1) are cold in
// a network: fetching their lines during the tile's K loop hides that latency (each measured at
// 3-4% of a cold call, interleaved A/B over the benchmark layers).
struct PrefetchList {
    const float* base = nullptr;
    int64_t ld = 0, per_row = 1, count = 0;
};

// The lines of an mr x np output tile at row stride ldc.
inline PrefetchList output_tile(const float* c, int64_t ldc, int64_t mr, int64_t np) {
    PrefetchList pw;
    pw.base = c;
    pw.ld = ldc;
    pw.per_row = (np + 15) / 16;
    pw.count = mr * pw.per_row;
    return pw;
}

// kMasked: the column block is narrower than 16*NV; full blocks use plain loads (a zero-masking
// load may need an extra ALU uop on some cores; no difference beyond noise was measured here).
template <int NV, bool kMasked>
inline void microkernel_8xNV(int64_t K, const float* __restrict a, const float* __restrict b, int64_t ldb,
                             float* __restrict c, int64_t ldc, int64_t mr, int64_t np,
                             const float* __restrict row_bias, PrefetchList pw) {
    __m512 acc[8][NV];
    __mmask16 mask[NV];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
#pragma GCC unroll 3
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) {
        const int64_t rem = np - 16 * j;
        mask[j] = rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u);
    }
#pragma GCC unroll 4
    for (int64_t k = 0; k < K; ++k) {
        _mm_prefetch(reinterpret_cast<const char*>(b + (k + 6) * ldb), _MM_HINT_T0);
        if (k < pw.count) __builtin_prefetch(pw.base + (k / pw.per_row) * pw.ld + (k % pw.per_row) * 16, 1, 3);
        __m512 bv[NV];
#pragma GCC unroll 3
        for (int j = 0; j < NV; ++j)
            bv[j] = kMasked ? _mm512_maskz_loadu_ps(mask[j], b + k * ldb + 16 * j) : _mm512_loadu_ps(b + k * ldb + 16 * j);
        const float* ak = a + k * 8;
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
            const __m512 av = _mm512_set1_ps(ak[i]);
#pragma GCC unroll 3
            for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
        if (i >= mr) break;
        const __m512 bias = _mm512_set1_ps(row_bias ? row_bias[i] : 0.0f);
#pragma GCC unroll 3
        for (int j = 0; j < NV; ++j)
            _mm512_mask_storeu_ps(c + i * ldc + 16 * j, mask[j], _mm512_add_ps(acc[i][j], bias));
    }
}

inline void microkernel_8xN(int64_t K, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
                            int64_t mr, int64_t np, const float* bias, PrefetchList pw) {
    if (np == 48)
        microkernel_8xNV<3, false>(K, a, b, ldb, c, ldc, mr, np, bias, pw);
    else if (np > 32)
        microkernel_8xNV<3, true>(K, a, b, ldb, c, ldc, mr, np, bias, pw);
    else if (np > 16)
        microkernel_8xNV<2, true>(K, a, b, ldb, c, ldc, mr, np, bias, pw);
    else
        microkernel_8xNV<1, true>(K, a, b, ldb, c, ldc, mr, np, bias, pw);
}

// b_pack: null, or room for K x 48 floats: each column block of B is first copied there
// contiguously (for a B with a large row stride, e.g. image channels: fewer cache lines and TLB
// entries per k, and the block stays in L1 across all row panels of A).
void gemm_packed(int64_t M, int64_t P, int64_t K, const float* A, const float* B, int64_t ldb, float* C,
                 int64_t ldc, const float* row_bias, float* b_pack) {
    if (!b_pack) {
        // Rows outer: each panel of A stays in L1 and C is written as 8 sequential streams (the
        // output of stage 4 can exceed L2; 8 streams keep its write-allocation cheap), while B (a
        // band buffer already in L2) streams past.
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int64_t mr = (M - m0) < 8 ? (M - m0) : 8;
            const float* bias = row_bias ? row_bias + m0 : nullptr;
            for (int64_t p0 = 0; p0 < P; p0 += 48) {
                const int64_t np = (P - p0) < 48 ? (P - p0) : 48;
                microkernel_8xN(K, A + m0 * K, B + p0, ldb, C + m0 * ldc + p0, ldc, mr, np, bias,
                                output_tile(C + m0 * ldc + p0, ldc, mr, np));
            }
        }
        return;
    }
    // Columns outer: each K x 48 block of B is packed contiguously and stays in L1 while the
    // panels of A stream past it.
    for (int64_t p0 = 0; p0 < P; p0 += 48) {
        const int64_t np = (P - p0) < 48 ? (P - p0) : 48;
        __mmask16 mask[3];
        for (int j = 0; j < 3; ++j) {
            const int64_t rem = np - 16 * j;
            mask[j] = rem >= 16 ? __mmask16(0xFFFF) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1u);
        }
        // B's rows are K separate streams (image channels), too many for the hardware prefetcher:
        // fetch the next block's lines while copying this one.
        const bool prefetch_next = p0 + 48 < P;
        for (int64_t k = 0; k < K; ++k) {
            const float* row = B + k * ldb + p0;
            if (prefetch_next)
                for (int j = 3; j < 7; ++j) _mm_prefetch(reinterpret_cast<const char*>(row + 16 * j), _MM_HINT_T0);
            for (int j = 0; j < 3; ++j)
                _mm512_mask_storeu_ps(b_pack + k * 48 + 16 * j, mask[j], _mm512_maskz_loadu_ps(mask[j], row + 16 * j));
        }
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int64_t mr = (M - m0) < 8 ? (M - m0) : 8;
            microkernel_8xN(K, A + m0 * K, b_pack, 48, C + m0 * ldc + p0, ldc, mr, np,
                            row_bias ? row_bias + m0 : nullptr, output_tile(C + m0 * ldc + p0, ldc, mr, np));
        }
    }
}

// For each of `rows` rows t: dst[t * ds + i] = sum_j coeff[j] * src[t * ss + i + offset[j]], i in
// [0, n); every read is inside the source; taps <= 16 (the driver's tap groups). All taps accumulate
// in registers; one store per 16 outputs. The coefficients and tail mask are set up once for all rows
// (per row they were ~40% of the time on 13-wide rows, perf). T > 0: the tap count as a template
// parameter for the common kernel sizes (fully unrolled); T == 0: `taps` at run time.
template <int T>
inline void taps_rows_fixed(int64_t rows, int64_t n, int64_t taps, const float* __restrict coeff,
                            const int64_t* __restrict offset, const float* __restrict src, int64_t ss,
                            float* __restrict dst, int64_t ds) {
    constexpr int kMax = T > 0 ? T : 16;
    const int count = T > 0 ? T : int(taps);
    __m512 c[kMax];
#pragma GCC unroll 8
    for (int j = 0; j < count; ++j) c[j] = _mm512_set1_ps(coeff[j]);
    const int64_t full = n / 16 * 16;
    const __mmask16 m = __mmask16((1u << (n - full)) - 1u);
    for (int64_t t = 0; t < rows; ++t) {
        const float* row = src + t * ss;
        float* out = dst + t * ds;
        for (int64_t i0 = 0; i0 < full; i0 += 16) {
            __m512 acc = _mm512_mul_ps(c[0], _mm512_loadu_ps(row + offset[0] + i0));
#pragma GCC unroll 8
            for (int j = 1; j < count; ++j) acc = _mm512_fmadd_ps(c[j], _mm512_loadu_ps(row + offset[j] + i0), acc);
            _mm512_storeu_ps(out + i0, acc);
        }
        if (full < n) {
            __m512 acc = _mm512_mul_ps(c[0], _mm512_maskz_loadu_ps(m, row + offset[0] + full));
#pragma GCC unroll 8
            for (int j = 1; j < count; ++j)
                acc = _mm512_fmadd_ps(c[j], _mm512_maskz_loadu_ps(m, row + offset[j] + full), acc);
            _mm512_mask_storeu_ps(out + full, m, acc);
        }
    }
}

void taps_rows(int64_t rows, int64_t n, int64_t taps, const float* __restrict coeff,
               const int64_t* __restrict offset, const float* __restrict src, int64_t ss, float* __restrict dst,
               int64_t ds) {
    switch (taps) {
        case 1: return taps_rows_fixed<1>(rows, n, taps, coeff, offset, src, ss, dst, ds);
        case 2: return taps_rows_fixed<2>(rows, n, taps, coeff, offset, src, ss, dst, ds);
        case 3: return taps_rows_fixed<3>(rows, n, taps, coeff, offset, src, ss, dst, ds);
        case 4: return taps_rows_fixed<4>(rows, n, taps, coeff, offset, src, ss, dst, ds);
        case 5: return taps_rows_fixed<5>(rows, n, taps, coeff, offset, src, ss, dst, ds);
        case 7: return taps_rows_fixed<7>(rows, n, taps, coeff, offset, src, ss, dst, ds);
        default: return taps_rows_fixed<0>(rows, n, taps, coeff, offset, src, ss, dst, ds);
    }
}

#include "fused/cp_conv_fused_driver.inc"

}  // namespace
}  // namespace cpconv::fused::avx512_impl

void cpconv::fused::f32_cpconv_fused__avx512(const FusedProblem& p) { avx512_impl::run_problem(p); }

#else  // not x86: never selected (isa_supported() is false), but the symbol must exist.
#include <stdexcept>
void cpconv::fused::f32_cpconv_fused__avx512(const FusedProblem&) {
    throw std::runtime_error("the avx512 kernel is only built for x86");
}
#endif
