// Probe: the fused kernel's AVX-512 8x48 GEMM microkernel (same loop as csrc/fused/
// cp_conv_fused_avx512.cpp) in isolation, to tell the microkernel's own speed from the cost of the
// data flow around it. Build and run (AVX-512 CPU):
//   g++ -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma benchmarks/fused_microkernel_probe.cpp -o probe && ./probe
// Cases: (a) B packed (K x 48 contiguous), C a small L1-resident tile; (b) the stage-4 shape of
// AlexNet conv3 R=64 (M=384, K=64, P=169) with B read at row stride P (as T3 is) and C written at
// row stride P (as the NCHW output is); (c) as (b) with B packed panel-major.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

template <int NV>
__attribute__((noinline)) void microkernel(int64_t K, const float* __restrict a, const float* __restrict b, int64_t ldb,
                                           float* __restrict c, int64_t ldc, int64_t np) {
    __m512 acc[8][NV];
    __mmask16 mask[NV];
    for (int j = 0; j < NV; ++j) {
        const int64_t rem = np - 16 * j;
        mask[j] = rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u);
    }
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int64_t k = 0; k < K; ++k) {
        __m512 bv[NV];
        for (int j = 0; j < NV; ++j) bv[j] = _mm512_maskz_loadu_ps(mask[j], b + k * ldb + 16 * j);
        for (int i = 0; i < 8; ++i) {
            const __m512 av = _mm512_set1_ps(a[k * 8 + i]);
            for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < NV; ++j) _mm512_mask_storeu_ps(c + i * ldc + 16 * j, mask[j], acc[i][j]);
}

double best_gflops(int64_t flops_per_iter, int iters, void (*body)()) {
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int it = 0; it < iters; ++it) body();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (flops_per_iter * double(iters) / s / 1e9 > best) best = flops_per_iter * double(iters) / s / 1e9;
    }
    return best;
}

constexpr int64_t M = 384, K = 64, P = 169;
std::vector<float> A(M * 256, 1.0f), B(256 * (P + 48), 1.0f), C(M * P + 64), Csmall(8 * 48);

int main() {
    std::printf("(a) B packed, C in L1 (M=128, K=256):  %.1f GFLOP/s\n", best_gflops(2 * 128 * 256 * 48, 4000, [] {
        for (int64_t m = 0; m < 128; m += 8) microkernel<3>(256, A.data() + m * 256, B.data(), 48, Csmall.data(), 48, 48);
    }));
    std::printf("(b) stage-4 shape, B and C at stride P: %.1f GFLOP/s\n", best_gflops(2 * M * K * P, 400, [] {
        for (int64_t m = 0; m < M; m += 8)
            for (int64_t p = 0; p < P; p += 48) {
                const int64_t np = P - p < 48 ? P - p : 48;
                if (np > 32) microkernel<3>(K, A.data() + m * K, B.data() + p, P, C.data() + m * P + p, P, np);
                else microkernel<2>(K, A.data() + m * K, B.data() + p, P, C.data() + m * P + p, P, np);
            }
    }));
    std::printf("(c) as (b), B panel-major:              %.1f GFLOP/s\n", best_gflops(2 * M * K * P, 400, [] {
        for (int64_t m = 0; m < M; m += 8)
            for (int64_t p = 0; p < P; p += 48) {
                const int64_t np = P - p < 48 ? P - p : 48;
                if (np > 32) microkernel<3>(K, A.data() + m * K, B.data() + p * K, 48, C.data() + m * P + p, P, np);
                else microkernel<2>(K, A.data() + m * K, B.data() + p * K, 48, C.data() + m * P + p, P, np);
            }
    }));
}
