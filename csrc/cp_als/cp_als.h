// CP-ALS for dense order-3/4 tensors on raw row-major buffers (no Python, no torch types).
//
// Model: X[i0,..,i_{N-1}] ~= sum_r weights[r] * prod_n A_n[i_n, r], every A_n stored row-major
// (I_n x R) with unit-norm columns on return.
//
// One sweep costs two big GEMMs (a two-level dimension tree):
//   1. M_0 = X_(0) * KR(A_1..A_{N-1}), with the Khatri-Rao product built in cache-sized row blocks
//      and never materialised whole;
//   2. W = X_(0)^T * A_0 (after A_0 is updated), a (I_1...I_{N-1}) x R tensor from which the MTTKRPs
//      of modes 1..N-1 are cheap contractions (O(R * P / I_0) each).
// The R x R normal equations use cached Gram matrices (only the updated factor's is recomputed) and a
// Cholesky solve with a ridge fallback when singular; the error comes from the last MTTKRP.
#pragma once
#include <cstdint>
#include <vector>

namespace cpconv {

struct CPALSOptions {
    int64_t max_iter = 500;
    double tol = 1e-6;  // stop when |e_{k-1} - e_k| < tol * e_{k-1} or |e_{k-1}^2 - e_k^2| < eps(T)
                        // (the resolution of the error formula); tol = 0 runs max_iter iterations
    bool line_search = false;  // Bro-style extrapolation, kept only when it lowers the error
    double l2_reg = 0.0;       // added to the diagonal of every normal-equation matrix
    int num_threads = 1;
};

struct CPALSReport {
    std::vector<double> error_history;  // ||X - X_hat|| / ||X|| after each iteration (fast formula)
    int64_t n_iter = 0;
    bool converged = false;
    int64_t line_search_accepted = 0;
    int64_t regularised_solves = 0;  // normal-equation solves that needed the ridge fallback
};

// Throws std::invalid_argument naming the offending value.
void validate_cp_als_problem(const std::vector<int64_t>& shape, int64_t rank);

// factors[n] points to I_n x R row-major storage: the initial factors on entry, the final (unit-column)
// factors on return. weights receives R values. x must not be identically zero.
template <typename T>
CPALSReport cp_als(const T* x, const std::vector<int64_t>& shape, int64_t rank, const std::vector<T*>& factors,
                   double* weights, const CPALSOptions& options);

// gram (I_n x I_n, row-major) = X_(n) X_(n)^T, the Gram matrix of the mode-n unfolding; its leading
// eigenvectors are the leading left singular vectors of X_(n) (the "svd" initialisation) without ever
// forming the (P / I_n)-wide right singular vectors.
template <typename T>
void unfolding_gram(const T* x, const std::vector<int64_t>& shape, int mode, double* gram);

// ||X - [[weights; factors]]||_F / ||X||_F by explicit reconstruction in row blocks (never the whole
// reconstruction at once), residual accumulated in double.
template <typename T>
double cp_relative_error(const T* x, const std::vector<int64_t>& shape, int64_t rank,
                         const std::vector<const T*>& factors, const double* weights, int num_threads);

}  // namespace cpconv
