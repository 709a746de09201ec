// Analytic EVBMF / VBMF solvers (Nakajima et al., JMLR 2013; NIPS 2012) on a precomputed spectrum.
//
// Torch-free and LAPACK-free: the caller supplies the singular values g_1 >= ... >= g_H of an L x M
// matrix Y (L <= M, H <= L) and ||Y||_F^2; the solvers return the rank, the noise variance, the
// truncation threshold and the shrunk singular values.
#pragma once

#include <cstdint>
#include <vector>

namespace cpconv {

struct VbmfSpectrum {
    const double* singular_values;  // H values, non-increasing, >= 0
    int64_t count;                  // H (may be < L when the spectrum was truncated)
    int64_t rows;                   // L (<= cols)
    int64_t cols;                   // M
    double frobenius_sq;            // ||Y||_F^2 (>= sum of the given g_h^2)
};

struct VbmfSolution {
    int64_t rank = 0;
    double sigma2 = 0.0;        // noise variance, in the units of Y^2
    double threshold = 0.0;     // singular values strictly above it are kept
    double tau_bar = 0.0;       // EVBMF only
    double x_bar = 0.0;         // EVBMF only
    double search_lower = 0.0;  // noise-variance search interval (Y^2 units); 0, 0 when sigma2 was given
    double search_upper = 0.0;
    std::vector<double> shrunk;  // H values; 0 beyond rank
};

// The root tau > sqrt(alpha) of log(tau + 1) + alpha * log(tau / alpha + 1) - tau = 0, 0 < alpha <= 1.
double evbmf_tau_bar(double alpha);

// Empirical VBMF: noise variance and prior both estimated. The noise variance minimises the EVB free
// energy on log(sigma^2) with the data normalised by its RMS, so the rank does not depend on the scale.
VbmfSolution evbmf_solve(const VbmfSpectrum& spectrum);

// VBMF with a known prior product c = c_a * c_b (> 0, units of Y). sigma2 > 0 is used as given;
// sigma2 <= 0 means "estimate it" by the same EVB noise-variance search as evbmf_solve.
VbmfSolution vbmf_solve(const VbmfSpectrum& spectrum, double prior, double sigma2);

}  // namespace cpconv
