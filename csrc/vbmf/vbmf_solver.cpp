// Analytic EVBMF / VBMF (Nakajima, Sugiyama, Babacan, Tomioka, JMLR 2013; Nakajima et al., NIPS 2012).
//
// All the work happens on the RMS-normalised spectrum (g_h / rms with rms^2 = ||Y||_F^2 / (L M)), so
// the noise-variance search sees the same numbers whatever the scale of Y; results are scaled back.
#include "vbmf/vbmf_solver.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace cpconv {
namespace {

// Lowest noise variance the search considers, relative to the mean square of Y. A noise-free low-rank
// matrix drives the EVB free energy to -infinity as sigma^2 -> 0; this floor keeps the search finite
// while staying far below any float32 rounding noise.
constexpr double kRelativeNoiseFloor = 1e-12;
// Log-spaced candidates of the coarse global scan before the golden-section refinement.
constexpr int kScanPoints = 400;

void validate(const VbmfSpectrum& s) {
    if (s.rows < 1 || s.cols < s.rows)
        throw std::invalid_argument("spectrum needs 1 <= L <= M, got L=" + std::to_string(s.rows) +
                                    ", M=" + std::to_string(s.cols));
    if (s.count < 1 || s.count > s.rows)
        throw std::invalid_argument("spectrum needs 1 <= H <= L singular values, got H=" +
                                    std::to_string(s.count) + " for L=" + std::to_string(s.rows));
    if (!std::isfinite(s.frobenius_sq) || s.frobenius_sq < 0)
        throw std::invalid_argument("||Y||_F^2 must be finite and >= 0");
    double sum_sq = 0.0;
    for (int64_t h = 0; h < s.count; ++h) {
        const double g = s.singular_values[h];
        if (!std::isfinite(g) || g < 0)
            throw std::invalid_argument("singular values must be finite and >= 0 (index " + std::to_string(h) + ")");
        if (h > 0 && g > s.singular_values[h - 1])
            throw std::invalid_argument("singular values must be sorted in non-increasing order (index " +
                                        std::to_string(h) + ")");
        sum_sq += g * g;
    }
    if (sum_sq > s.frobenius_sq * (1.0 + 1e-6) + 1e-300)
        throw std::invalid_argument("sum of squared singular values exceeds ||Y||_F^2");
}

// tau(x): the larger root of tau + alpha / tau = x - 1 - alpha (defined for x >= (1 + sqrt(alpha))^2).
double tau_of_x(double x, double alpha) {
    const double b = x - (1.0 + alpha);
    const double disc = std::max(b * b - 4.0 * alpha, 0.0);
    return 0.5 * (b + std::sqrt(disc));
}

// log(tau + 1) + alpha log(tau / alpha + 1) - tau: zero at tau_bar, negative beyond it.
double evb_gain(double tau, double alpha) {
    return std::log1p(tau) + alpha * std::log1p(tau / alpha) - tau;
}

// Normalised spectrum: g_h / rms, with the mean square of the normalised matrix equal to 1.
struct NormalisedSpectrum {
    std::vector<double> g;
    double rms = 0.0;
    double frobenius_sq = 0.0;  // = L * M after normalisation (up to the residual's rounding)
    int64_t L = 0, M = 0, H = 0;
};

NormalisedSpectrum normalise(const VbmfSpectrum& s) {
    NormalisedSpectrum n;
    n.L = s.rows;
    n.M = s.cols;
    n.H = s.count;
    n.rms = std::sqrt(s.frobenius_sq / (static_cast<double>(s.rows) * static_cast<double>(s.cols)));
    n.g.assign(s.singular_values, s.singular_values + s.count);
    if (n.rms > 0) {
        for (double& g : n.g) g /= n.rms;
        n.frobenius_sq = s.frobenius_sq / (n.rms * n.rms);
    }
    return n;
}

// EVB free energy in the noise variance s (normalised units), up to terms constant in s:
//   Omega(s) = ||Y||^2 / (M s) + L log s + sum_{h: x_h > x_bar} gain(tau(x_h)),   x_h = g_h^2 / (M s).
// This equals sum_h psi(x_h) + R_res / (M s) + (L - H) log s minus sum_h log(g_h^2 / M): the -log x_h
// part of psi only contributes log(M s) per value, which also makes exact zeros in the spectrum harmless.
double evb_objective(const NormalisedSpectrum& n, double alpha, double x_bar, double s) {
    const double M = static_cast<double>(n.M);
    double value = n.frobenius_sq / (M * s) + static_cast<double>(n.L) * std::log(s);
    for (int64_t h = 0; h < n.H; ++h) {
        const double x = n.g[h] * n.g[h] / (M * s);
        if (x <= x_bar) break;  // sorted: every later value is below the threshold too
        value += evb_gain(tau_of_x(x, alpha), alpha);
    }
    return value;
}

struct NoiseSearch {
    double sigma2, lower, upper;  // normalised units
};

// Minimise the EVB free energy over s in [lower, upper] (DESIGN.md's bounds) on a log scale: a coarse
// scan over log-spaced points plus every point where a singular value crosses the threshold (the
// objective's kinks), then golden-section refinement around the best candidate.
NoiseSearch evb_noise_search(const NormalisedSpectrum& n, double alpha, double x_bar) {
    const double L = static_cast<double>(n.L), M = static_cast<double>(n.M);
    const double upper = n.frobenius_sq / (L * M);
    const int64_t h_bar = std::min<int64_t>(static_cast<int64_t>(std::ceil(L / (1.0 + alpha))) - 1, n.H);
    double lower;
    if (h_bar < n.H) {
        double tail = 0.0;
        for (int64_t h = h_bar; h < n.H; ++h) tail += n.g[h] * n.g[h];
        // Missing values of a truncated spectrum carry the residual energy.
        double residual = std::max(n.frobenius_sq, 0.0);
        for (int64_t h = 0; h < n.H; ++h) residual -= n.g[h] * n.g[h];
        residual = std::max(residual, 0.0);
        const double tail_mean = (tail + residual) / static_cast<double>(n.L - h_bar);
        lower = std::max(n.g[h_bar] * n.g[h_bar] / (M * x_bar), tail_mean / M);
    } else {
        double residual = n.frobenius_sq;
        for (int64_t h = 0; h < n.H; ++h) residual -= n.g[h] * n.g[h];
        lower = std::max(residual, 0.0) / (static_cast<double>(n.L - n.H) * M);
    }
    lower = std::min(std::max(lower, kRelativeNoiseFloor * upper), upper);
    if (!(upper > lower)) return {upper, lower, upper};

    const double log_lo = std::log(lower), log_hi = std::log(upper);
    std::vector<double> candidates;
    candidates.reserve(kScanPoints + n.H);
    for (int i = 0; i < kScanPoints; ++i)
        candidates.push_back(log_lo + (log_hi - log_lo) * i / (kScanPoints - 1));
    for (int64_t h = 0; h < n.H; ++h) {
        if (n.g[h] <= 0) break;
        const double log_kink = std::log(n.g[h] * n.g[h] / (M * x_bar));
        if (log_kink > log_lo && log_kink < log_hi) candidates.push_back(log_kink);
    }
    std::sort(candidates.begin(), candidates.end());
    auto f = [&](double log_s) { return evb_objective(n, alpha, x_bar, std::exp(log_s)); };
    size_t best = 0;
    double best_value = std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < candidates.size(); ++i) {
        const double v = f(candidates[i]);
        if (v < best_value) {
            best_value = v;
            best = i;
        }
    }
    double a = candidates[best == 0 ? 0 : best - 1];
    double b = candidates[std::min(best + 1, candidates.size() - 1)];
    const double inv_phi = (std::sqrt(5.0) - 1.0) / 2.0;
    double c = b - inv_phi * (b - a), d = a + inv_phi * (b - a);
    double fc = f(c), fd = f(d);
    for (int it = 0; it < 200 && (b - a) > 1e-13 * std::max(1.0, std::fabs(a)); ++it) {
        if (fc <= fd) {
            b = d;
            d = c;
            fd = fc;
            c = b - inv_phi * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + inv_phi * (b - a);
            fd = f(d);
        }
    }
    double log_best = candidates[best];
    const double mid = 0.5 * (a + b);
    if (f(mid) <= best_value) log_best = mid;
    return {std::min(std::max(std::exp(log_best), lower), upper), lower, upper};
}

}  // namespace

double evbmf_tau_bar(double alpha) {
    if (!(alpha > 0.0 && alpha <= 1.0))
        throw std::invalid_argument("alpha = L/M must be in (0, 1], got " + std::to_string(alpha));
    // evb_gain is concave in tau, positive at sqrt(alpha) and -> -inf: one root beyond sqrt(alpha).
    double lo = std::sqrt(alpha), hi = std::max(1.0, 4.0 * std::sqrt(alpha));
    while (evb_gain(hi, alpha) > 0) hi *= 2.0;
    for (int it = 0; it < 2000; ++it) {
        const double mid = 0.5 * (lo + hi);
        if (mid <= lo || mid >= hi) break;  // interval at machine precision
        (evb_gain(mid, alpha) > 0 ? lo : hi) = mid;
    }
    return 0.5 * (lo + hi);
}

VbmfSolution evbmf_solve(const VbmfSpectrum& spectrum) {
    validate(spectrum);
    const NormalisedSpectrum n = normalise(spectrum);
    const double L = static_cast<double>(n.L), M = static_cast<double>(n.M);
    const double alpha = L / M;
    VbmfSolution out;
    out.tau_bar = evbmf_tau_bar(alpha);
    out.x_bar = (1.0 + out.tau_bar) * (1.0 + alpha / out.tau_bar);
    out.shrunk.assign(n.H, 0.0);
    if (!(n.rms > 0)) return out;  // Y = 0: no signal, no noise

    const NoiseSearch search = evb_noise_search(n, alpha, out.x_bar);
    const double s = search.sigma2;
    const double threshold = std::sqrt(M * s * out.x_bar);
    for (int64_t h = 0; h < n.H && n.g[h] > threshold; ++h) {
        const double g = n.g[h];
        const double a = 1.0 - (L + M) * s / (g * g);
        const double disc = std::max(a * a - 4.0 * L * M * s * s / (g * g * g * g), 0.0);
        out.shrunk[h] = 0.5 * g * (a + std::sqrt(disc)) * n.rms;
        out.rank = h + 1;
    }
    const double rms2 = n.rms * n.rms;
    out.sigma2 = s * rms2;
    out.threshold = threshold * n.rms;
    out.search_lower = search.lower * rms2;
    out.search_upper = search.upper * rms2;
    return out;
}

VbmfSolution vbmf_solve(const VbmfSpectrum& spectrum, double prior, double sigma2) {
    validate(spectrum);
    if (!(prior > 0) || !std::isfinite(prior))
        throw std::invalid_argument("prior c = c_a * c_b must be finite and > 0, got " + std::to_string(prior));
    if (!std::isfinite(sigma2)) throw std::invalid_argument("sigma2 must be finite");
    const NormalisedSpectrum n = normalise(spectrum);
    const double L = static_cast<double>(n.L), M = static_cast<double>(n.M);
    VbmfSolution out;
    out.shrunk.assign(n.H, 0.0);
    if (!(n.rms > 0)) {
        out.sigma2 = sigma2 > 0 ? sigma2 : 0.0;
        if (sigma2 > 0) {
            const double t = 0.5 * (L + M + sigma2 / (prior * prior));
            out.threshold = std::sqrt(sigma2 * (t + std::sqrt(std::max(t * t - L * M, 0.0))));
        }
        return out;
    }
    const double rms2 = n.rms * n.rms;
    double s;
    if (sigma2 > 0) {
        s = sigma2 / rms2;
    } else {
        const double alpha = L / M;
        const double tau_bar = evbmf_tau_bar(alpha);
        const NoiseSearch search = evb_noise_search(n, alpha, (1.0 + tau_bar) * (1.0 + alpha / tau_bar));
        s = search.sigma2;
        out.search_lower = search.lower * rms2;
        out.search_upper = search.upper * rms2;
    }
    const double c = prior / n.rms;
    const double t = 0.5 * (L + M + s / (c * c));
    const double threshold = std::sqrt(s * (t + std::sqrt(std::max(t * t - L * M, 0.0))));
    for (int64_t h = 0; h < n.H && n.g[h] > threshold; ++h) {
        const double g = n.g[h];
        const double factor =
            1.0 - s / (2.0 * g * g) * (L + M + std::sqrt((M - L) * (M - L) + 4.0 * g * g / (c * c)));
        out.shrunk[h] = std::max(g * factor, 0.0) * n.rms;
        out.rank = h + 1;
    }
    out.sigma2 = s * rms2;
    out.threshold = threshold * n.rms;
    return out;
}

}  // namespace cpconv
