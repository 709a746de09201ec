// CP-ALS kernels: dimension-tree MTTKRPs on OpenBLAS GEMMs, cached Grams, Cholesky normal equations.
// See cp_als.h for the scheme. Every parallel loop splits work statically by thread index and reduces
// per-thread partial sums in thread order, so results are bit-for-bit repeatable for a thread count.
//
// Threads: plain std::threads started for each large parallel phase (the two GEMM phases of a sweep)
// and joined at its end, OpenBLAS single-threaded inside. Not OpenMP: an OpenMP team's idle workers
// spin-wait through the serial phases between (the R x R solves), and on a busy machine that spinning
// took the core from the thread doing the serial work (measured: 2 threads 4x slower than 1 with
// libgomp's default wait policy). Not OpenBLAS's own pool either (its workers also spin; measured
// 10-20x slower under load). A thread start costs ~20 us, negligible next to a phase (>= 1 ms).
#include "cp_als/cp_als.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "cp_als/openblas_api.h"

namespace cpconv {

namespace {

// Khatri-Rao row blocks are kept around this size so a block stays in L2 while the GEMM streams X.
constexpr int64_t kKhatriRaoBlockBytes = 256 * 1024;

// Below this many multiply-adds per thread, waking a second thread costs more than it saves (and on a
// loaded machine a barrier can wait a whole scheduler slice).
constexpr int64_t kMinWorkPerThread = int64_t(1) << 20;

int threads_for_work(int64_t work, int num_threads) {
    return static_cast<int>(std::clamp<int64_t>(work / kMinWorkPerThread, 1, num_threads));
}

// Runs body(t) for t = 0..threads-1, t = 0 on the calling thread; returns when all are done.
// body must not throw (callers allocate everything beforehand).
template <typename Body>
void run_in_threads(int threads, Body&& body) {
    if (threads <= 1) {
        body(0);
        return;
    }
    std::vector<std::thread> workers;
    workers.reserve(static_cast<size_t>(threads - 1));
    int started = 1;
    try {
        for (; started < threads; ++started) workers.emplace_back([&body, t = started] { body(t); });
    } catch (const std::system_error&) {
        // No thread could be started (resource limits): do the remaining parts here instead.
    }
    for (int t = started; t < threads; ++t) body(t);
    body(0);
    for (auto& w : workers) w.join();
}

std::pair<int64_t, int64_t> split_range(int64_t n, int parts, int index) {
    return {n * index / parts, n * (index + 1) / parts};
}

int64_t product(const std::vector<int64_t>& v, size_t begin, size_t end) {
    int64_t p = 1;
    for (size_t i = begin; i < end; ++i) p *= v[i];
    return p;
}

// out (prod rows x R, row-major) = Khatri-Rao product of mats in C order (the last matrix's row index
// varies fastest). An empty list gives a single row of ones.
template <typename Src, typename Dst>
void khatri_rao(const std::vector<const Src*>& mats, const std::vector<int64_t>& rows, int64_t R, Dst* out) {
    int64_t total = 1;
    for (int64_t r : rows) total *= r;
    std::vector<int64_t> digit(mats.size(), 0);
    for (int64_t j = 0; j < total; ++j) {
        Dst* o = out + j * R;
        for (int64_t r = 0; r < R; ++r) o[r] = Dst(1);
        for (size_t k = 0; k < mats.size(); ++k) {
            const Src* m = mats[k] + digit[k] * R;
            for (int64_t r = 0; r < R; ++r) o[r] *= static_cast<Dst>(m[r]);
        }
        for (size_t k = mats.size(); k-- > 0;) {  // odometer increment, last digit fastest
            if (++digit[k] < rows[k]) break;
            digit[k] = 0;
        }
    }
}

// Number of mode-1 indices per Khatri-Rao row block (each index covers P/(I_0 I_1) rows).
template <typename T>
int64_t khatri_rao_block_rows(const std::vector<int64_t>& shape, int64_t R) {
    const int64_t bytes_per_mode1_row = product(shape, 2, shape.size()) * R * static_cast<int64_t>(sizeof(T));
    return std::clamp<int64_t>(kKhatriRaoBlockBytes / bytes_per_mode1_row, 1, shape[1]);
}

// Threads used by for_each_khatri_rao_block: rows of X_(0) are shared out, so with too few rows (or
// too little work) one thread does it all rather than idle ones building blocks.
int khatri_rao_block_threads(const std::vector<int64_t>& shape, int64_t R, int num_threads) {
    const int64_t I0 = shape[0];
    if (I0 < 2 * static_cast<int64_t>(num_threads)) return 1;
    return threads_for_work(product(shape, 0, shape.size()) * R, num_threads);
}

// Calls fn(thread, row_begin, row_end, col_begin, ncols, block) for every row block of
// KR(A_1..A_{N-1}) (P/I_0 rows x R), each thread owning rows [row_begin, row_end) of X_(0). Blocks follow
// the index of mode 1; the Khatri-Rao product of modes 2.. (P/(I_0 I_1) rows) is built once and shared.
// Each thread builds its own blocks (cheap next to its GEMM) so no barrier is needed.
template <typename T, typename Fn>
void for_each_khatri_rao_block(const std::vector<int64_t>& shape, const std::vector<const T*>& A, int64_t R,
                               int num_threads, Fn&& fn) {
    const int64_t I0 = shape[0], I1 = shape[1];
    const size_t N = shape.size();
    const int64_t rest_rows = product(shape, 2, N);
    std::vector<T> rest(static_cast<size_t>(rest_rows * R));
    std::vector<const T*> rest_mats(A.begin() + 2, A.end());
    std::vector<int64_t> rest_dims(shape.begin() + 2, shape.end());
    khatri_rao(rest_mats, rest_dims, R, rest.data());

    const int64_t rows_per_block = khatri_rao_block_rows<T>(shape, R);
    const int threads = khatri_rao_block_threads(shape, R, num_threads);
    const int64_t block_elems = rows_per_block * rest_rows * R;
    std::vector<T> blocks(static_cast<size_t>(block_elems * threads));
    const T* A1 = A[1];

    run_in_threads(threads, [&](int t) {
        const auto [row0, row1] = split_range(I0, threads, t);
        T* block = blocks.data() + block_elems * t;
        if (row1 > row0) {
            for (int64_t p0 = 0; p0 < I1; p0 += rows_per_block) {
                const int64_t p1 = std::min(I1, p0 + rows_per_block);
                for (int64_t p = p0; p < p1; ++p) {
                    const T* a = A1 + p * R;
                    for (int64_t q = 0; q < rest_rows; ++q) {
                        const T* k = rest.data() + q * R;
                        T* o = block + ((p - p0) * rest_rows + q) * R;
                        for (int64_t r = 0; r < R; ++r) o[r] = a[r] * k[r];
                    }
                }
                fn(t, row0, row1, p0 * rest_rows, (p1 - p0) * rest_rows, static_cast<const T*>(block));
            }
        }
    });
}

// out (I_0 x R) = X_(0) * KR(A_1..A_{N-1}): the mode-0 MTTKRP, GEMMs over Khatri-Rao row blocks.
template <typename T>
void mttkrp_mode0(const T* x, const std::vector<int64_t>& shape, const std::vector<const T*>& A, int64_t R,
                  int num_threads, T* out) {
    const int64_t J = product(shape, 1, shape.size());
    for_each_khatri_rao_block<T>(shape, A, R, num_threads,
                                 [&](int, int64_t row0, int64_t row1, int64_t col0, int64_t ncols, const T* block) {
                                     blas::gemm(false, false, row1 - row0, R, ncols, T(1), x + row0 * J + col0, J,
                                                block, R, col0 == 0 ? T(0) : T(1), out + row0 * R, R);
                                 });
}

// W (P/I_0 x R) = X_(0)^T * A_0: the partial contraction shared by the MTTKRPs of modes 1..N-1.
template <typename T>
void contract_mode0(const T* x, const std::vector<int64_t>& shape, const T* A0, int64_t R, int num_threads, T* W) {
    const int64_t I0 = shape[0];
    const int64_t J = product(shape, 1, shape.size());
    const int threads = J >= 64 * static_cast<int64_t>(num_threads) ? threads_for_work(I0 * J * R, num_threads) : 1;
    run_in_threads(threads, [&](int t) {
        const auto [j0, j1] = split_range(J, threads, t);
        if (j1 > j0) blas::gemm(true, false, j1 - j0, R, I0, T(1), x + j0, J, A0, R, T(0), W + j0 * R, R);
    });
}

// M (I_n x R) = MTTKRP of mode n >= 1 from W = X_(0)^T A_0 laid out as [i_1, ..., i_{N-1}, r]:
// M[i_n, r] = sum W[.., r] * prod_{k != 0, n} A_k[i_k, r], accumulated in double.
template <typename T>
void mttkrp_from_contraction(const T* W, const std::vector<int64_t>& shape, int n, const std::vector<const T*>& A,
                             int64_t R, int num_threads, double* M) {
    const size_t N = shape.size();
    const int64_t In = shape[n];
    const int64_t a = product(shape, 1, n), b = product(shape, n + 1, N);
    std::vector<double> Ka(static_cast<size_t>(a * R)), Kb(static_cast<size_t>(b * R));
    khatri_rao(std::vector<const T*>(A.begin() + 1, A.begin() + n), std::vector<int64_t>(shape.begin() + 1, shape.begin() + n),
               R, Ka.data());
    khatri_rao(std::vector<const T*>(A.begin() + n + 1, A.end()), std::vector<int64_t>(shape.begin() + n + 1, shape.end()),
               R, Kb.data());
    std::fill(M, M + In * R, 0.0);
    const int threads = R >= 16 * static_cast<int64_t>(num_threads) ? threads_for_work(a * In * b * R, num_threads) : 1;
    std::vector<double> inner_all(static_cast<size_t>(R));
    run_in_threads(threads, [&](int t) {
        const auto [c0, c1] = split_range(R, threads, t);
        double* inner = inner_all.data() + c0;
        const int64_t nc = c1 - c0;
        for (int64_t ia = 0; ia < a; ++ia) {
            const double* ka = Ka.data() + ia * R + c0;
            for (int64_t i = 0; i < In; ++i) {
                std::fill(inner, inner + nc, 0.0);
                const T* w = W + ((ia * In + i) * b) * R + c0;
                for (int64_t ib = 0; ib < b; ++ib, w += R) {
                    const double* kb = Kb.data() + ib * R + c0;
                    for (int64_t c = 0; c < nc; ++c) inner[c] += static_cast<double>(w[c]) * kb[c];
                }
                double* m = M + i * R + c0;
                for (int64_t c = 0; c < nc; ++c) m[c] += ka[c] * inner[c];
            }
        }
    });
}

// G (R x R) = A^T A in double for an I x R factor stored in T.
template <typename T>
void factor_gram(const T* A, int64_t I, int64_t R, double* G) {
    std::vector<double> Ad(A, A + I * R);
    blas::gram(R, I, Ad.data(), G);
}

// Normalises the columns of the double I x R matrix src into dst (type T) and returns the norms.
// A zero column stays zero with norm 0 (a dead component).
template <typename T>
void normalise_columns(const double* src, int64_t I, int64_t R, T* dst, double* norms) {
    std::fill(norms, norms + R, 0.0);
    for (int64_t i = 0; i < I; ++i)
        for (int64_t r = 0; r < R; ++r) norms[r] += src[i * R + r] * src[i * R + r];
    for (int64_t r = 0; r < R; ++r) norms[r] = std::sqrt(norms[r]);
    for (int64_t i = 0; i < I; ++i)
        for (int64_t r = 0; r < R; ++r)
            dst[i * R + r] = norms[r] > 0.0 ? static_cast<T>(src[i * R + r] / norms[r]) : T(0);
}

// Solves A V = M in place (M: rows x R row-major; V symmetric positive (semi)definite, R x R) by
// Cholesky. When V is numerically singular (collinear or dead components), retries with a growing
// ridge delta*I, delta from 1e-12 * mean(diag V). Returns true when the ridge was needed.
bool solve_normal_equations(const std::vector<double>& V, int64_t R, double* M, int64_t rows) {
    std::vector<double> chol(V);
    int info = scipy_LAPACKE_dpotrf_work(blas::kColMajor, 'L', static_cast<int>(R), chol.data(), static_cast<int>(R));
    bool regularised = false;
    if (info != 0) {
        regularised = true;
        double trace = 0.0;
        for (int64_t r = 0; r < R; ++r) trace += V[r * R + r];
        double delta = 1e-12 * std::max(trace / static_cast<double>(R), std::numeric_limits<double>::min());
        for (int attempt = 0; attempt < 16 && info != 0; ++attempt, delta *= 100.0) {
            chol = V;
            for (int64_t r = 0; r < R; ++r) chol[r * R + r] += delta;
            info = scipy_LAPACKE_dpotrf_work(blas::kColMajor, 'L', static_cast<int>(R), chol.data(), static_cast<int>(R));
        }
        if (info != 0)
            throw std::runtime_error("cp_als: the R x R normal equations could not be solved even with a ridge of " +
                                     std::to_string(delta) + " (non-finite values from overflow?)");
    }
    // Row-major M (rows x R) is column-major R x rows: the right-hand sides of V A^T = M^T.
    scipy_LAPACKE_dpotrs_work(blas::kColMajor, 'L', static_cast<int>(R), static_cast<int>(rows), chol.data(),
                         static_cast<int>(R), M, static_cast<int>(R));
    return regularised;
}

// ||X_hat||^2 = sum_{r,s} w_r w_s prod_n G_n[r, s] for unit-column factors with Grams G_n.
double model_norm2(const std::vector<std::vector<double>>& G, const std::vector<double>& w, int64_t R) {
    double total = 0.0;
    for (int64_t r = 0; r < R; ++r) {
        double row = 0.0;
        for (int64_t s = 0; s < R; ++s) {
            double h = w[s];
            for (const auto& g : G) h *= g[r * R + s];
            row += h;
        }
        total += w[r] * row;
    }
    return total;
}

double relative_error_from_terms(double norm_x2, double inner, double model2) {
    return std::sqrt(std::max(norm_x2 - 2.0 * inner + model2, 0.0) / norm_x2);
}

template <typename T>
double squared_norm(const T* x, int64_t P) {
    double s = 0.0;
    for (int64_t i = 0; i < P; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    return s;
}

}  // namespace

void validate_cp_als_problem(const std::vector<int64_t>& shape, int64_t rank) {
    if (shape.size() != 3 && shape.size() != 4)
        throw std::invalid_argument("cp_als: tensor must have order 3 or 4, got order " + std::to_string(shape.size()));
    int64_t P = 1;
    for (size_t n = 0; n < shape.size(); ++n) {
        if (shape[n] < 1)
            throw std::invalid_argument("cp_als: every dimension must be >= 1, got " + std::to_string(shape[n]) +
                                        " at mode " + std::to_string(n));
        P *= shape[n];
        if (P >= (int64_t(1) << 31))
            throw std::invalid_argument("cp_als: tensor must have fewer than 2**31 entries (32-bit BLAS)");
    }
    if (rank < 1) throw std::invalid_argument("cp_als: rank must be >= 1, got " + std::to_string(rank));
    if (rank * (P / shape[0]) >= (int64_t(1) << 31))
        throw std::invalid_argument("cp_als: rank * (entries / shape[0]) must be below 2**31 (32-bit BLAS)");
}

template <typename T>
CPALSReport cp_als(const T* x, const std::vector<int64_t>& shape, int64_t R, const std::vector<T*>& factors,
                   double* weights, const CPALSOptions& options) {
    validate_cp_als_problem(shape, R);
    const int N = static_cast<int>(shape.size());
    if (static_cast<int>(factors.size()) != N)
        throw std::invalid_argument("cp_als: expected " + std::to_string(N) + " factors, got " +
                                    std::to_string(factors.size()));
    if (options.max_iter < 0) throw std::invalid_argument("cp_als: max_iter must be >= 0");
    if (!(options.tol >= 0.0)) throw std::invalid_argument("cp_als: tol must be >= 0");
    if (!(options.l2_reg >= 0.0)) throw std::invalid_argument("cp_als: l2_reg must be >= 0");
    const int nt = std::max(1, options.num_threads);
    const int64_t P = product(shape, 0, N);
    const int64_t I0 = shape[0];
    const int64_t J = P / I0;

    blas::SingleThreadScope openblas_single_thread;
    const double norm_x2 = squared_norm(x, P);
    if (!(norm_x2 > 0.0)) throw std::invalid_argument("cp_als: tensor is identically zero");

    // State: unit-column factors A[n] (type T, the GEMM operands), their Grams, the weights.
    std::vector<std::vector<T>> A(N);
    std::vector<std::vector<double>> G(N, std::vector<double>(static_cast<size_t>(R * R)));
    std::vector<double> lambda(static_cast<size_t>(R), 1.0), norms(static_cast<size_t>(R));
    for (int n = 0; n < N; ++n) {
        const int64_t In = shape[n];
        A[n].resize(static_cast<size_t>(In * R));
        std::vector<double> init(factors[n], factors[n] + In * R);
        normalise_columns(init.data(), In, R, A[n].data(), norms.data());
        for (int64_t r = 0; r < R; ++r) lambda[r] *= norms[r];
        factor_gram(A[n].data(), In, R, G[n].data());
    }
    auto pointers = [](const std::vector<std::vector<T>>& mats) {
        std::vector<const T*> p;
        for (const auto& m : mats) p.push_back(m.data());
        return p;
    };

    int64_t max_rows = 0;
    for (int64_t d : shape) max_rows = std::max(max_rows, d);
    std::vector<T> M0(static_cast<size_t>(I0 * R)), M0_candidate(static_cast<size_t>(I0 * R));
    std::vector<T> W(static_cast<size_t>(J * R));
    std::vector<double> M(static_cast<size_t>(max_rows * R)), M_copy(static_cast<size_t>(max_rows * R));
    std::vector<double> V(static_cast<size_t>(R * R)), V_data(static_cast<size_t>(R * R));
    CPALSReport report;

    // Replaces A[n] by the least-squares update from its MTTKRP in M (I_n x R, overwritten). For the last
    // mode also returns the relative error of the updated model from <X, X_hat> = <M, A_n> and the Grams.
    auto update_mode = [&](int n, bool want_error) -> double {
        const int64_t In = shape[n];
        std::fill(V_data.begin(), V_data.end(), 1.0);
        for (int k = 0; k < N; ++k)
            if (k != n)
                for (int64_t e = 0; e < R * R; ++e) V_data[e] *= G[k][e];
        V = V_data;
        for (int64_t r = 0; r < R; ++r) V[r * R + r] += options.l2_reg;
        if (want_error) std::copy(M.begin(), M.begin() + In * R, M_copy.begin());
        if (solve_normal_equations(V, R, M.data(), In)) ++report.regularised_solves;
        normalise_columns(M.data(), In, R, A[n].data(), lambda.data());
        factor_gram(A[n].data(), In, R, G[n].data());
        if (!want_error) return 0.0;
        // <X, X_hat> with the factor as stored (rounded to T), consistent with its Gram: mixing the
        // unrounded solution in would put T's rounding error straight into the error estimate.
        double inner = 0.0;
        for (int64_t i = 0; i < In; ++i)
            for (int64_t r = 0; r < R; ++r)
                inner += M_copy[i * R + r] * static_cast<double>(A[n][i * R + r]) * lambda[r];
        // ||X_hat||^2 = lambda^T (V_data o G_n) lambda, with V_data the Hadamard product of the other Grams.
        double model2 = 0.0;
        for (int64_t r = 0; r < R; ++r)
            for (int64_t s = 0; s < R; ++s) model2 += lambda[r] * lambda[s] * V_data[r * R + s] * G[n][r * R + s];
        return relative_error_from_terms(norm_x2, inner, model2);
    };

    // Line-search state (Bro extrapolation, step iteration^(1/pow), pow grows after repeated failures).
    double ls_pow = 2.0;
    int ls_failures = 0;
    std::vector<std::vector<T>> A_prev, A_cand;
    std::vector<double> lambda_prev, lambda_cand(static_cast<size_t>(R));
    std::vector<std::vector<double>> G_cand;
    if (options.line_search) {
        A_cand = A;
        G_cand = G;
    }

    bool m0_ready = false;
    for (int64_t it = 1; it <= options.max_iter; ++it) {
        if (options.line_search) {
            A_prev = A;
            lambda_prev = lambda;
        }
        if (!m0_ready) mttkrp_mode0(x, shape, pointers(A), R, nt, M0.data());
        m0_ready = false;
        std::copy(M0.begin(), M0.end(), M.begin());
        update_mode(0, false);
        contract_mode0(x, shape, A[0].data(), R, nt, W.data());
        double err = 0.0;
        for (int n = 1; n < N; ++n) {
            mttkrp_from_contraction(W.data(), shape, n, pointers(A), R, nt, M.data());
            err = update_mode(n, n == N - 1);
        }

        if (options.line_search && it >= 3) {
            // Extrapolate from the previous iterate; the scale lives in the last factor so that both
            // iterates are in the same normalisation.
            const double step = std::pow(static_cast<double>(it), 1.0 / ls_pow);
            std::fill(lambda_cand.begin(), lambda_cand.end(), 1.0);
            for (int n = 0; n < N; ++n) {
                const int64_t In = shape[n];
                std::vector<double> c(static_cast<size_t>(In * R));
                const bool last = n == N - 1;
                for (int64_t i = 0; i < In; ++i)
                    for (int64_t r = 0; r < R; ++r) {
                        const double cur = static_cast<double>(A[n][i * R + r]) * (last ? lambda[r] : 1.0);
                        const double prev = static_cast<double>(A_prev[n][i * R + r]) * (last ? lambda_prev[r] : 1.0);
                        c[i * R + r] = prev + step * (cur - prev);
                    }
                normalise_columns(c.data(), In, R, A_cand[n].data(), norms.data());
                for (int64_t r = 0; r < R; ++r) lambda_cand[r] *= norms[r];
                factor_gram(A_cand[n].data(), In, R, G_cand[n].data());
            }
            mttkrp_mode0(x, shape, pointers(A_cand), R, nt, M0_candidate.data());
            double inner = 0.0;
            for (int64_t i = 0; i < I0; ++i)
                for (int64_t r = 0; r < R; ++r)
                    inner += static_cast<double>(M0_candidate[i * R + r]) * static_cast<double>(A_cand[0][i * R + r]) *
                             lambda_cand[r];
            const double err_cand = relative_error_from_terms(norm_x2, inner, model_norm2(G_cand, lambda_cand, R));
            if (err_cand < err) {
                std::swap(A, A_cand);
                std::swap(G, G_cand);
                std::swap(lambda, lambda_cand);
                std::swap(M0, M0_candidate);  // the next sweep's mode-0 MTTKRP, already computed
                m0_ready = true;
                err = err_cand;
                ls_failures = 0;
                ++report.line_search_accepted;
            } else if (++ls_failures == 4) {
                ls_pow += 1.0;
                ls_failures = 0;
            }
        }

        if (!std::isfinite(err))
            throw std::runtime_error("cp_als: the error became non-finite at iteration " + std::to_string(it) +
                                     " (overflow; try l2_reg > 0)");
        report.error_history.push_back(err);
        report.n_iter = it;
        const size_t h = report.error_history.size();
        const double prev = h >= 2 ? report.error_history[h - 2] : std::numeric_limits<double>::infinity();
        // The error formula ||X||^2 - 2<X, X_hat> + ||X_hat||^2 rests on MTTKRPs rounded in T, so changes
        // of e^2 below eps(T) (relative to ||X||^2) are rounding, not progress: treat as converged
        // (unless tol = 0, which asks for exactly max_iter iterations).
        const double resolution = options.tol > 0.0 ? std::numeric_limits<T>::epsilon() : 0.0;
        if (err == 0.0 || std::abs(prev - err) < options.tol * prev || std::abs(prev * prev - err * err) < resolution) {
            report.converged = true;
            break;
        }
    }

    for (int n = 0; n < N; ++n) std::copy(A[n].begin(), A[n].end(), factors[n]);
    std::copy(lambda.begin(), lambda.end(), weights);
    return report;
}

template <typename T>
void unfolding_gram(const T* x, const std::vector<int64_t>& shape, int mode, double* gram) {
    const int N = static_cast<int>(shape.size());
    if (mode < 0 || mode >= N)
        throw std::invalid_argument("unfolding_gram: mode must be in [0, " + std::to_string(N) + "), got " +
                                    std::to_string(mode));
    blas::SingleThreadScope openblas_single_thread;
    const int64_t In = shape[mode];
    const int64_t a = product(shape, 0, mode), b = product(shape, mode + 1, N);
    const int64_t K = a * b;
    std::vector<double> unfolding(static_cast<size_t>(In * K));  // X_(n), In x (a*b), in double
    for (int64_t ia = 0; ia < a; ++ia)
        for (int64_t i = 0; i < In; ++i) {
            const T* src = x + (ia * In + i) * b;
            double* dst = unfolding.data() + i * K + ia * b;
            for (int64_t ib = 0; ib < b; ++ib) dst[ib] = static_cast<double>(src[ib]);
        }
    blas::gemm(false, true, In, In, K, 1.0, unfolding.data(), K, unfolding.data(), K, 0.0, gram, In);
}

template <typename T>
double cp_relative_error(const T* x, const std::vector<int64_t>& shape, int64_t R, const std::vector<const T*>& factors,
                         const double* weights, int num_threads) {
    validate_cp_als_problem(shape, R);
    if (factors.size() != shape.size()) throw std::invalid_argument("cp_relative_error: wrong number of factors");
    blas::SingleThreadScope openblas_single_thread;
    const int nt = std::max(1, num_threads);
    const int64_t P = product(shape, 0, shape.size());
    const int64_t I0 = shape[0];
    const int64_t J = P / I0;
    const double norm_x2 = squared_norm(x, P);
    if (!(norm_x2 > 0.0)) throw std::invalid_argument("cp_relative_error: tensor is identically zero");
    std::vector<T> scaled_first(static_cast<size_t>(I0 * R));
    for (int64_t i = 0; i < I0; ++i)
        for (int64_t r = 0; r < R; ++r) scaled_first[i * R + r] = static_cast<T>(factors[0][i * R + r] * weights[r]);
    std::vector<double> partial(static_cast<size_t>(nt), 0.0);
    // Per-thread reconstruction of one block (at most all rows x the widest block), sized up front
    // because nothing may throw inside the parallel region.
    const int64_t widest = khatri_rao_block_rows<T>(shape, R) * product(shape, 2, shape.size());
    const int threads = khatri_rao_block_threads(shape, R, nt);
    const int64_t rows_per_thread = (I0 + threads - 1) / threads;
    std::vector<std::vector<T>> recon(static_cast<size_t>(nt),
                                      std::vector<T>(static_cast<size_t>(rows_per_thread * widest)));
    for_each_khatri_rao_block<T>(
        shape, factors, R, nt, [&](int t, int64_t row0, int64_t row1, int64_t col0, int64_t ncols, const T* block) {
            auto& buf = recon[t];
            blas::gemm(false, true, row1 - row0, ncols, R, T(1), scaled_first.data() + row0 * R, R, block, R, T(0),
                       buf.data(), ncols);
            double s = 0.0;
            for (int64_t i = row0; i < row1; ++i) {
                const T* xi = x + i * J + col0;
                const T* yi = buf.data() + (i - row0) * ncols;
                for (int64_t c = 0; c < ncols; ++c) {
                    const double d = static_cast<double>(xi[c]) - static_cast<double>(yi[c]);
                    s += d * d;
                }
            }
            partial[t] += s;
        });
    double residual = 0.0;
    for (double s : partial) residual += s;
    return std::sqrt(residual / norm_x2);
}

template CPALSReport cp_als<float>(const float*, const std::vector<int64_t>&, int64_t, const std::vector<float*>&, double*,
                                   const CPALSOptions&);
template CPALSReport cp_als<double>(const double*, const std::vector<int64_t>&, int64_t, const std::vector<double*>&,
                                    double*, const CPALSOptions&);
template void unfolding_gram<float>(const float*, const std::vector<int64_t>&, int, double*);
template void unfolding_gram<double>(const double*, const std::vector<int64_t>&, int, double*);
template double cp_relative_error<float>(const float*, const std::vector<int64_t>&, int64_t,
                                         const std::vector<const float*>&, const double*, int);
template double cp_relative_error<double>(const double*, const std::vector<int64_t>&, int64_t,
                                          const std::vector<const double*>&, const double*, int);

}  // namespace cpconv
