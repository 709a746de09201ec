// The few BLAS/LAPACK entry points CP-ALS uses, from the scipy-openblas32 wheel.
// That build prefixes every symbol (scipy_cblas_sgemm, scipy_LAPACKE_dpotrf, ...) so it never clashes
// with another BLAS in the process (numpy's scipy_openblas64_, torch's MKL/oneDNN). Its integers are
// 32-bit, which is why the Python wrapper refuses tensors with 2**31 or more entries.
#pragma once
#include <cblas.h>

#include <cstdint>

extern "C" {
// Declared here rather than through lapacke.h, whose complex-type macros do not suit C++ builds.
// The _work variants skip LAPACKE's NaN scan of the inputs (ours are finite by construction).
int scipy_LAPACKE_dpotrf_work(int matrix_layout, char uplo, int n, double* a, int lda);
int scipy_LAPACKE_dpotrs_work(int matrix_layout, char uplo, int n, int nrhs, const double* a, int lda,
                              double* b, int ldb);
}

namespace cpconv::blas {

constexpr int kColMajor = 102;  // LAPACK_COL_MAJOR

// Row-major C = alpha * op(A) * op(B) + beta * C.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
    scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                      static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
                      static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
                      static_cast<blasint>(ldc));
}

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                 int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
    scipy_cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                      static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
                      static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
                      static_cast<blasint>(ldc));
}

// Row-major C (n x n) = A^T A for A (k x n); both triangles are filled.
inline void gram(int64_t n, int64_t k, const double* a, double* c) {
    scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<blasint>(n), static_cast<blasint>(k), 1.0,
                      a, static_cast<blasint>(n), 0.0, c, static_cast<blasint>(n));
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < i; ++j) c[i * n + j] = c[j * n + i];
}

// OpenBLAS stays single-threaded inside CP-ALS: the parallelism comes from our own threads splitting
// the GEMMs (see cp_als.cpp), so OpenBLAS's pthread pool never competes with torch's threads.
// (openblas_set_num_threads is process-wide; the previous value is restored on exit.)
class SingleThreadScope {
public:
    SingleThreadScope() : previous_(scipy_openblas_get_num_threads()) {
        if (previous_ != 1) scipy_openblas_set_num_threads(1);
    }
    ~SingleThreadScope() {
        if (previous_ != 1) scipy_openblas_set_num_threads(previous_);
    }
    SingleThreadScope(const SingleThreadScope&) = delete;
    SingleThreadScope& operator=(const SingleThreadScope&) = delete;

private:
    int previous_;
};

}  // namespace cpconv::blas
