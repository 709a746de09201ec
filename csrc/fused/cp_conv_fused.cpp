// Packing, instruction-set selection and the per-call set-up of the fused kernel (baseline flags).
#include "fused/cp_conv_fused.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace cpconv::fused {

namespace {
void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(what);
}
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
// Target size of one band's R-channel buffers (T1 + T2 + T3). They are written afresh on every call
// and, inside a network, start out of cache; 384 KiB measured 4-6% faster than 768 KiB on layers
// whose buffers exceed it (AlexNet conv2, VGG conv3_1 at R >= 128) after other data was read, and
// the same with warm caches (interleaved A/B, 1 thread).
constexpr int64_t kBandBytes = int64_t(384) << 10;
// Bands keep at least this many output columns (rows x OW): the stage-4 GEMM's tiles are 48 wide.
constexpr int64_t kMinBandColumns = 192;
// One image on several threads is split by channels when its whole R-channel buffers fit this
// much per thread.
constexpr int64_t kSplitBytesPerThread = int64_t(768) << 10;

// GNU libgomp is not fork-safe: in a child forked after the parent ran a parallel region with
// several threads, a new multi-threaded region waits forever for the parent's pool threads, which
// the child does not have. In a forked child the kernel therefore runs on the calling thread only.
std::atomic<bool> g_forked_child{false};
// Set once a call has run a parallel region with several threads (see ran_multithreaded).
std::atomic<bool> g_ran_multithreaded{false};
const bool g_atfork_registered = [] {
    return pthread_atfork(nullptr, nullptr, [] { g_forked_child.store(true, std::memory_order_relaxed); }) == 0;
}();
}  // namespace

bool in_forked_child() { return g_forked_child.load(std::memory_order_relaxed); }
bool ran_multithreaded() { return g_ran_multithreaded.load(std::memory_order_relaxed); }

int64_t PackedWeights::stage1_group_floats() const {
    return round_up(rank / groups, kPanelRows) * (in_channels / groups);
}
int64_t PackedWeights::stage4_group_floats() const {
    return round_up(out_channels / groups, kPanelRows) * (rank / groups);
}
const float* PackedWeights::stage1(int64_t g) const {
    return data.data() + g * (stage1_group_floats() + stage4_group_floats());
}
const float* PackedWeights::stage4(int64_t g) const { return stage1(g) + stage1_group_floats(); }
const float* PackedWeights::vert() const {
    return data.data() + groups * (stage1_group_floats() + stage4_group_floats());
}
const float* PackedWeights::horz() const { return vert() + kernel_h * rank; }
const float* PackedWeights::bias() const { return horz() + kernel_w * rank; }

PackedWeights pack_weights(int64_t out_channels, int64_t in_channels, int64_t rank, int64_t groups,
                           int64_t kernel_h, int64_t kernel_w, const float* in_factor, const float* vert_factor,
                           const float* horz_factor, const float* out_factor, const float* bias) {
    require(groups >= 1, "groups must be >= 1, got " + std::to_string(groups));
    require(out_channels >= 1 && in_channels >= 1 && rank >= 1 && kernel_h >= 1 && kernel_w >= 1,
            "channel counts, rank and kernel sizes must be >= 1");
    require(in_channels % groups == 0 && out_channels % groups == 0 && rank % groups == 0,
            "in_channels=" + std::to_string(in_channels) + ", out_channels=" + std::to_string(out_channels) +
                " and rank=" + std::to_string(rank) + " must be divisible by groups=" + std::to_string(groups));
    PackedWeights w;
    w.out_channels = out_channels;
    w.in_channels = in_channels;
    w.rank = rank;
    w.groups = groups;
    w.kernel_h = kernel_h;
    w.kernel_w = kernel_w;
    w.has_bias = bias != nullptr;
    const int64_t Cg = in_channels / groups, Ng = out_channels / groups, Rg = rank / groups;
    const int64_t per_group = w.stage1_group_floats() + w.stage4_group_floats();
    w.data.assign(static_cast<size_t>(groups * per_group + (kernel_h + kernel_w) * rank + out_channels), 0.0f);
    for (int64_t g = 0; g < groups; ++g) {
        float* a1 = w.data.data() + g * per_group;
        for (int64_t r = 0; r < Rg; ++r)  // panel r / 8, row r % 8
            for (int64_t c = 0; c < Cg; ++c)
                a1[(r / kPanelRows) * kPanelRows * Cg + c * kPanelRows + r % kPanelRows] =
                    in_factor[c * rank + g * Rg + r];
        float* a4 = a1 + w.stage1_group_floats();
        for (int64_t n = 0; n < Ng; ++n)
            for (int64_t r = 0; r < Rg; ++r)
                a4[(n / kPanelRows) * kPanelRows * Rg + r * kPanelRows + n % kPanelRows] =
                    out_factor[(g * Ng + n) * Rg + r];
    }
    float* tail = w.data.data() + groups * per_group;
    std::copy(vert_factor, vert_factor + kernel_h * rank, tail);
    std::copy(horz_factor, horz_factor + kernel_w * rank, tail + kernel_h * rank);
    if (bias) std::copy(bias, bias + out_channels, tail + (kernel_h + kernel_w) * rank);
    return w;
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::avx512: return "avx512";
        case Isa::avx2: return "avx2";
        default: return "generic";
    }
}

Isa isa_from_name(const std::string& name) {
    if (name == "avx512") return Isa::avx512;
    if (name == "avx2") return Isa::avx2;
    if (name == "generic") return Isa::generic;
    throw std::invalid_argument("unknown instruction set '" + name + "'; valid: avx512, avx2, generic");
}

bool isa_supported(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (isa) {
        case Isa::avx512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("fma");
        case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        default: return true;
    }
#else
    return isa == Isa::generic;
#endif
}

Isa best_isa() {
    static const Isa best = isa_supported(Isa::avx512) ? Isa::avx512
                            : isa_supported(Isa::avx2) ? Isa::avx2
                                                       : Isa::generic;
    return best;
}

void run_fused(const CPConvShape& s, const float* x, const PackedWeights& w, float* y, int threads, Isa isa,
               double* stage_seconds) {
    validate_cp_conv_shape(s);
    require(threads >= 1, "threads must be >= 1, got " + std::to_string(threads));
    require(w.out_channels == s.out_channels && w.in_channels == s.in_channels && w.rank == s.rank &&
                w.groups == s.groups && w.kernel_h == s.kernel_h && w.kernel_w == s.kernel_w,
            "the packed weights were made for a different layer shape");
    require(isa_supported(isa), std::string("instruction set ") + isa_name(isa) + " is not supported by this CPU");
    const int64_t OH = s.out_height(), W = s.width, OW = s.out_width();
    const int64_t Rg = s.rank / s.groups;
    if (in_forked_child()) threads = 1;  // (see g_forked_child)

    // Work items: batch x row chunks; split the rows only when the batch alone cannot keep the
    // threads evenly busy (every chunk boundary recomputes a few stage-1 rows).
    int64_t chunks = 1;
    if (threads > 1 && s.batch % threads != 0) chunks = std::min<int64_t>(threads, OH);
    const int threads_requested = threads;
    threads = static_cast<int>(std::min<int64_t>(threads, s.batch * chunks));

    // Band height: the band's R-channel buffers within kBandBytes, at least kMinBandColumns outputs.
    const int64_t w2 = W + 2 * s.pad_w;
    const int64_t per_row = Rg * (s.stride_h * W + OW) * int64_t(sizeof(float));
    const int64_t halo = std::max<int64_t>(0, (s.kernel_h - 1) * s.dilation_h + 1 - s.stride_h);
    const int64_t budget = kBandBytes;
    const int64_t rows_per_chunk = (OH + chunks - 1) / chunks;
    int64_t band = (budget - Rg * halo * W * int64_t(sizeof(float))) / std::max<int64_t>(per_row, 1);
    band = std::max<int64_t>(band, (kMinBandColumns + OW - 1) / OW);
    band = std::max<int64_t>(1, std::min(band, rows_per_chunk));
    // Stage-1 rows of one band in padded coordinates (zero rows included).
    const int64_t t1_rows = (band - 1) * s.stride_h + (s.kernel_h - 1) * s.dilation_h + 1;
    // Each buffer starts on a 64-byte boundary (kAlignFloats), so the GEMMs' full-vector loads from
    // the packing block never straddle two cache lines; +16 floats per thread keep the threads'
    // buffers from sharing lines.
    const int64_t ws_floats = Rg * round_up(t1_rows * W, kAlignFloats) + round_up(band * w2, kAlignFloats) +
                              Rg * round_up(band * OW, kAlignFloats) + 48 * (s.in_channels / s.groups) + 16;

    // One image on several threads, small enough to keep whole: split channels, not rows.
    const int64_t full_t1_rows = (OH - 1) * s.stride_h + (s.kernel_h - 1) * s.dilation_h + 1;
    const bool split_channels = threads > 1 && s.groups == 1 && s.batch % threads != 0 &&
                                s.rank >= 8 * threads && s.out_channels >= 8 * threads &&
                                s.rank * (full_t1_rows * W + OH * OW) * int64_t(sizeof(float)) <= threads * kSplitBytesPerThread;
    int64_t need = ws_floats * threads;
    int64_t p_t1_rows = t1_rows, p_ws_floats = ws_floats, p_band = band, p_chunks = chunks;
    int p_threads = threads;
    if (split_channels) {
        p_threads = threads_requested;
        p_t1_rows = full_t1_rows;
        p_band = OH;
        p_chunks = 1;
        p_ws_floats = round_up(OH * w2, kAlignFloats) + 48 * s.in_channels + 16;
        need = s.rank * round_up(full_t1_rows * W, kAlignFloats) + s.rank * round_up(OH * OW, kAlignFloats) +
               p_ws_floats * p_threads;
    }
    // Reused across calls from the same calling thread: no page faults per call.
    // (kAlignFloats extra floats let the used part start on a 64-byte boundary.)
    thread_local std::unique_ptr<float[]> workspace;
    thread_local int64_t workspace_size = 0;
    if (need > workspace_size) {
        workspace.reset(new float[static_cast<size_t>(need + kAlignFloats)]);
        workspace_size = need;
    }
    float* aligned_workspace = workspace.get();
    aligned_workspace += (kAlignFloats - (reinterpret_cast<uintptr_t>(aligned_workspace) / sizeof(float)) % kAlignFloats) %
                         kAlignFloats;
    std::unique_ptr<double[]> timing;
    if (stage_seconds) {
        timing.reset(new double[static_cast<size_t>(4 * std::max(threads, threads_requested))]());
    }
    FusedProblem p{s,        x,           y,      &w, p_threads, p_band, p_chunks, split_channels,
                  p_t1_rows, aligned_workspace, p_ws_floats, timing.get()};
    threads = p_threads;
    if (threads > 1 && !g_ran_multithreaded.load(std::memory_order_relaxed))
        g_ran_multithreaded.store(true, std::memory_order_relaxed);
    switch (isa) {
        case Isa::avx512: f32_cpconv_fused__avx512(p); break;
        case Isa::avx2: f32_cpconv_fused__avx2(p); break;
        default: f32_cpconv_fused__generic(p); break;
    }
    if (stage_seconds) {  // slot 2 stays 0: stages 2 and 3 are timed together in slot 1
        for (int st = 0; st < 4; ++st) {
            stage_seconds[st] = 0.0;
            for (int t = 0; t < threads; ++t) stage_seconds[st] += timing[4 * t + st];
        }
    }
}

}  // namespace cpconv::fused
