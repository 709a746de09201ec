// The fused CP convolution: all four stages in one pass over bands of output rows.
//
// Torch-free: raw float pointers and shapes. The public entry points (pack, run, ISA query) live in
// cp_conv_fused.cpp, compiled for baseline x86-64; the kernels live in one translation unit per
// instruction set (cp_conv_fused_{avx512,avx2,generic}.cpp, each with its own -m flags) and are picked
// at run time from the CPU's features.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "reference/cp_conv_reference.h"

namespace cpconv::fused {

// Width of the packed weight panels (rows of A broadcast by the GEMM microkernels). Every ISA uses
// the same packing, so one packed buffer serves all of them.
constexpr int64_t kPanelRows = 8;

// The workspace and each buffer in it start on a multiple of this many floats (64 bytes).
constexpr int64_t kAlignFloats = 16;

// Weights packed once per weight version. Layout of `data` (floats), per group g in turn:
//   stage-1 panels: ceil(Rg/8) panels of [Cg][8] holding S[c, g*Rg + r] (zero rows past Rg)
//   stage-4 panels: ceil(Ng/8) panels of [Rg][8] holding U[g*Ng + n, r] (zero rows past Ng)
// then Y (kh x R), X (kw x R) and the bias (N, zeros when there is none), copied as given.
struct PackedWeights {
    int64_t out_channels = 0, in_channels = 0, rank = 0, groups = 1, kernel_h = 1, kernel_w = 1;
    bool has_bias = false;
    std::vector<float> data;

    int64_t stage1_group_floats() const;
    int64_t stage4_group_floats() const;
    const float* stage1(int64_t g) const;
    const float* stage4(int64_t g) const;
    const float* vert() const;
    const float* horz() const;
    const float* bias() const;
};

// Packs the factors (layouts of the reference kernel: S (C/G x R), Y (kh x R), X (kw x R),
// U (N x R/G), bias (N) or null). Throws std::invalid_argument on inconsistent sizes.
PackedWeights pack_weights(int64_t out_channels, int64_t in_channels, int64_t rank, int64_t groups,
                           int64_t kernel_h, int64_t kernel_w, const float* in_factor, const float* vert_factor,
                           const float* horz_factor, const float* out_factor, const float* bias);

enum class Isa { generic = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
// Throws std::invalid_argument for an unknown name ("auto" is resolved by the caller).
Isa isa_from_name(const std::string& name);
bool isa_supported(Isa isa);
// The best instruction set this CPU (and OS) supports.
Isa best_isa();

// Everything one kernel call needs; filled by run_fused (cp_conv_fused.cpp).
struct FusedProblem {
    CPConvShape s;
    const float* x;  // B x C x H x W
    float* y;        // B x N x OH x OW
    const PackedWeights* w;
    int threads;         // OpenMP threads for this call (>= 1)
    int64_t band_rows;   // output rows per band
    int64_t row_chunks;  // contiguous row ranges per image (work items = batch * row_chunks)
    bool split_channels;  // threads split ranks / output channels of one image (see run_split_channels)
    int64_t t1_rows;     // capacity (rows) of the stage-1 buffer
    float* workspace;    // threads * workspace_floats, 64-byte aligned (workspace_floats: a multiple of 16)
    int64_t workspace_floats;
    double* stage_seconds;  // null, or threads x 4 accumulators (debug timing: stage 1, 2+3, -, 4)
};

// Per-ISA kernels (names: dtype_op__isa). Each runs the whole problem with p.threads threads.
void f32_cpconv_fused__generic(const FusedProblem& p);
void f32_cpconv_fused__avx2(const FusedProblem& p);
void f32_cpconv_fused__avx512(const FusedProblem& p);

// True in a process forked from the one that loaded the extension (after fork(), libgomp cannot
// start multi-threaded regions safely).
bool in_forked_child();
// True once a call in this process has run its parallel region with several threads (after which a
// forked child cannot start multi-threaded OpenMP regions, the kernel's or PyTorch's).
bool ran_multithreaded();

// Runs the fused kernel: y = CPConv(x) with zero padding. threads >= 1 (1 in a forked child, see
// in_forked_child). Allocates the per-thread band buffers (reused across calls from the same calling
// thread). If stage_seconds is not null it
// receives 4 sums over threads of thread CPU seconds measured inside the kernel: stage 1,
// stages 2+3 (timed together), 0, stage 4.
void run_fused(const CPConvShape& s, const float* x, const PackedWeights& w, float* y, int threads, Isa isa,
               double* stage_seconds = nullptr);

}  // namespace cpconv::fused
