"""The fused CP convolution kernel and its torch custom op, against two independent references.

References: the plain C++ kernel (``cpconv.cp_conv2d_reference``, double accumulators) and
``F.conv2d`` in float64 on the dense kernel reconstructed from the factors. Every failing case prints
all of its parameters.
"""

from __future__ import annotations

import concurrent.futures
import copy as copy_module
import dataclasses
import io
import pickle
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.fx
import torch.nn.functional as F
import torch.nn.utils.parametrize
import torch.nn.utils.prune

import cpconv
from cpconv import CPConv2d, cp_conv2d_fused, cp_conv2d_reference
from cpconv import fused

ISAS = fused.supported_isas()
TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    in_channels: int
    out_channels: int
    rank: int
    groups: int
    height: int
    width: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    bias: bool
    seed: int


def make_tensors(case: Case):
    gen = torch.Generator().manual_seed(case.seed)
    g = case.groups
    kh, kw = case.kernel
    x = torch.randn(case.batch, case.in_channels, case.height, case.width, generator=gen)
    U = torch.randn(case.out_channels, case.rank // g, generator=gen)
    S = torch.randn(case.in_channels // g, case.rank, generator=gen)
    Y = torch.randn(kh, case.rank, generator=gen)
    X = torch.randn(kw, case.rank, generator=gen)
    b = torch.randn(case.out_channels, generator=gen) if case.bias else None
    return x, (U, S, Y, X), b


def dense_conv_float64(case: Case, x, factors, bias):
    """F.conv2d in float64 with the kernel sum_r U S Y X reconstructed per group."""
    U, S, Y, X = (f.double() for f in factors)
    g = case.groups
    rg, ng, cg = case.rank // g, case.out_channels // g, case.in_channels // g
    weight = torch.einsum(
        "gnr,cgr,igr,jgr->gncij",
        U.reshape(g, ng, rg), S.reshape(cg, g, rg), Y.reshape(-1, g, rg), X.reshape(-1, g, rg),
    ).reshape(case.out_channels, cg, *case.kernel)
    return F.conv2d(x.double(), weight, None if bias is None else bias.double(), stride=case.stride,
                    padding=case.padding, dilation=case.dilation, groups=g)


def relative_error(actual, expected) -> float:
    scale = expected.abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / max(scale, 1e-30)


def random_case(rng: random.Random, seed: int, big_rank: bool = False) -> Case:
    groups = rng.choice([1, 1, 1, 2, 3])
    kh, kw = rng.randint(1, 5), rng.randint(1, 5)
    dh, dw = rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2])
    sh, sw = rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 3])
    ph, pw = rng.randint(0, kh), rng.randint(0, kw)
    if big_rank:  # ranks up to 512: few of them, spatially small, few channels
        rank_per_group = rng.randint(100, 512 // groups)
        cg, ng = rng.randint(1, 6), rng.randint(1, 20)
        extra_h, extra_w = rng.randint(0, 5), rng.randint(0, 5)
    else:
        rank_per_group = rng.choice([rng.randint(1, 9), rng.randint(1, 40)])
        cg, ng = rng.randint(1, 24), rng.randint(1, 40)
        extra_h, extra_w = rng.randint(0, 20), rng.randint(0, 20)
    height = max(1, dh * (kh - 1) + 1 - 2 * ph) + extra_h
    width = max(1, dw * (kw - 1) + 1 - 2 * pw) + extra_w
    return Case(
        batch=rng.randint(1, 4), in_channels=cg * groups, out_channels=ng * groups, rank=rank_per_group * groups,
        groups=groups, height=height, width=width, kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw),
        dilation=(dh, dw), bias=rng.random() < 0.7, seed=seed,
    )


def check_case(case: Case, isa: str, threads: int) -> None:
    x, factors, bias = make_tensors(case)
    geometry = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    actual = cp_conv2d_fused(x, factors, bias, threads=threads, isa=isa, **geometry)
    reference = cp_conv2d_reference(x, factors, bias, **geometry)
    dense = dense_conv_float64(case, x, factors, bias)
    assert actual.shape == reference.shape == dense.shape, (case, isa, threads)
    err_ref = relative_error(actual, reference)
    err_dense = relative_error(actual, dense)
    assert err_ref <= TOLERANCE and err_dense <= TOLERANCE, (
        f"isa={isa} threads={threads} {case}: relative error {err_ref:.3g} vs the C++ reference, "
        f"{err_dense:.3g} vs F.conv2d"
    )


CASES_PER_RUN = 170  # x (ISAs supported, up to 3) x (threads 1, 2): >= 1000 configurations on AVX-512 machines


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
def test_random_configurations_match_references(isa, threads):
    rng = random.Random(f"{isa}-{threads}")
    for i in range(CASES_PER_RUN):
        check_case(random_case(rng, seed=i, big_rank=(i % 40 == 0)), isa, threads)


def tile_cases():
    """Shapes around the microkernels' tiles: panel rows 8 (and 4), columns 8/16/24/32/48."""
    seed = 0
    for rank in (1, 7, 8, 9, 16, 17):
        for out_channels in (1, 7, 8, 9, 25):
            for width in (1, 7, 8, 15, 16, 17, 33, 47, 48, 49):
                seed += 1
                yield Case(1, 3, out_channels, rank, 1, 2, width, (1, 3), (1, 1), (0, 1), (1, 1), True, seed)


@pytest.mark.parametrize("isa", ISAS)
def test_tile_boundaries(isa):
    for case in tile_cases():
        check_case(case, isa, threads=1)


def depthwise_row_cases():
    """The depthwise stages on rows of 1 to 300 columns (several vectors and a tail), taps up to 17
    (past the kernels' tap groups of 16), dilations, and zero padding up to 33 columns."""
    rng = random.Random(7)
    seed = 1000
    for width in (1, 15, 16, 17, 33, 100, 250, 256, 257, 300):
        for kw, dw, pw in ((1, 1, 0), (3, 1, 1), (7, 2, 6), (16, 1, 15), (17, 1, 8), (3, 5, 20), (5, 1, 33)):
            seed += 1
            kh, dh = rng.choice([(1, 1), (3, 1), (3, 2), (17, 1)])
            height = max(1, dh * (kh - 1) + 1) + rng.randint(0, 3)
            sh, sw = rng.choice([1, 2]), rng.choice([1, 1, 2])
            if width + 2 * pw < dw * (kw - 1) + 1:
                continue
            yield Case(1, 2, 3, rng.choice([1, 5, 9]), 1, height, width, (kh, kw), (sh, sw), (rng.randint(0, kh), pw),
                       (dh, dw), False, seed)


@pytest.mark.parametrize("isa", ISAS)
def test_depthwise_row_paths(isa):
    for case in depthwise_row_cases():
        check_case(case, isa, threads=1)


@pytest.mark.parametrize("isa", ISAS)
def test_benchmark_like_layer(isa):
    # AlexNet conv3 at rank 64: real channel counts, several bands per thread, two threads.
    case = Case(1, 256, 384, 64, 1, 13, 13, (3, 3), (1, 1), (1, 1), (1, 1), True, 7)
    check_case(case, isa, threads=2)
    # Larger map with small bands: stage-1 row reuse across bands.
    case = Case(2, 32, 48, 200, 1, 40, 37, (5, 3), (1, 1), (2, 1), (1, 1), True, 8)
    check_case(case, isa, threads=1)
    # Several bands with a row stride, dilation and groups (band rows shared across a stride).
    case = Case(1, 24, 36, 384, 3, 47, 52, (3, 3), (2, 1), (2, 1), (2, 1), False, 9)
    check_case(case, isa, threads=1)


def test_isa_selection_is_reported():
    assert ISAS[-1] == "generic"
    assert fused.best_isa() == ISAS[0]
    assert set(ISAS) <= {"avx512", "avx2", "generic"}


# ------------------------------------------------------------------------------------- custom op
def op_args(case: Case, x, factors, bias, threads=1):
    U, S, Y, X = factors
    return (x, S, Y, X, U, bias, list(case.stride), list(case.padding), list(case.dilation), case.groups, threads,
            "auto")


@pytest.mark.parametrize("seed", range(4))
def test_opcheck(seed):
    case = random_case(random.Random(seed), seed)
    x, factors, bias = make_tensors(case)
    torch.library.opcheck(torch.ops.cpconv.cp_conv2d.default, op_args(case, x, factors, bias))


def test_op_matches_function_and_channels_last_input():
    case = Case(2, 6, 10, 12, 2, 9, 11, (3, 3), (2, 1), (1, 1), (1, 2), True, 3)
    x, factors, bias = make_tensors(case)
    expected = cp_conv2d_reference(x, factors, bias, stride=case.stride, padding=case.padding,
                                   dilation=case.dilation, groups=case.groups)
    out = torch.ops.cpconv.cp_conv2d(*op_args(case, x, factors, bias))
    assert relative_error(out, expected) <= TOLERANCE
    out_cl = torch.ops.cpconv.cp_conv2d(*op_args(case, x.to(memory_format=torch.channels_last), factors, bias))
    assert relative_error(out_cl, expected) <= TOLERANCE


def test_bad_inputs_raise_clearly():
    case = Case(1, 4, 6, 8, 1, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), True, 1)
    x, (U, S, Y, X), bias = make_tensors(case)
    with pytest.raises(TypeError, match="float32"):
        cp_conv2d_fused(x.double(), (U, S, Y, X), bias)
    with pytest.raises(TypeError, match="float32"):
        cp_conv2d_fused(x, (U.double(), S, Y, X), bias)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.cpconv.cp_conv2d(x.half(), S, Y, X, U, bias, [1, 1], [1, 1], [1, 1], 1, 1, "auto")
    with pytest.raises(ValueError, match="4-D"):
        cp_conv2d_fused(x[0], (U, S, Y, X), bias)
    with pytest.raises(ValueError, match="channels"):
        cp_conv2d_fused(x[:, :3], (U, S, Y, X), bias)
    with pytest.raises(ValueError, match="same number of columns"):
        cp_conv2d_fused(x, (U, S, Y[:, :5], X), bias)
    with pytest.raises(ValueError, match="out_factor"):
        cp_conv2d_fused(x, (U[:, :3], S, Y, X), bias)
    with pytest.raises(ValueError, match="bias"):
        cp_conv2d_fused(x, (U, S, Y, X), bias[:2])
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        cp_conv2d_fused(x[:, :, :2], (U, S, Y, X), bias, padding=0)
    with pytest.raises(ValueError, match="isa"):
        cp_conv2d_fused(x, (U, S, Y, X), bias, isa="sse9")
    with pytest.raises(ValueError, match="threads"):
        cp_conv2d_fused(x, (U, S, Y, X), bias, threads=-1)
    with pytest.raises(ValueError, match="groups"):
        cp_conv2d_fused(x, (U, S, Y, X), bias, groups=3)
    with pytest.raises(ValueError, match="stride"):
        cp_conv2d_fused(x, (U, S, Y, X), bias, stride=0)
    with pytest.raises(ValueError, match="padding"):
        cp_conv2d_fused(x, (U, S, Y, X), bias, padding=-1)
    with pytest.raises(ValueError, match="factors"):
        cp_conv2d_fused(x, (U, S, Y), bias)
    # The C++ binding itself rejects a mis-shaped output instead of writing past it.
    packed = fused.pack_weights((U, S, Y, X), bias)
    wrong = torch.empty(1, 6, 7, 6).numpy()
    with pytest.raises(ValueError, match="y must have shape"):
        cpconv._core.fused.cp_conv2d(x.numpy(), packed, wrong, (1, 1), (1, 1), (1, 1), 1, "auto")


def test_concurrent_calls_from_python_threads_agree():
    cases = [random_case(random.Random(100 + i), 100 + i) for i in range(8)]
    inputs = [make_tensors(c) for c in cases]

    def run(i):
        c = cases[i]
        x, factors, bias = inputs[i]
        return cp_conv2d_fused(x, factors, bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                               groups=c.groups, threads=2)

    sequential = [run(i) for i in range(len(cases))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            concurrent_results = list(pool.map(run, list(range(len(cases))) * 2))
            for i, out in enumerate(concurrent_results):
                assert torch.equal(out, sequential[i % len(cases)]), cases[i % len(cases)]


# ---------------------------------------------------------------------------------------- CPConv2d
def make_layer(**kwargs) -> CPConv2d:
    torch.manual_seed(0)
    args = dict(in_channels=6, out_channels=8, kernel_size=3, rank=10, padding=1)
    args.update(kwargs)
    return CPConv2d(**args)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(groups=2, stride=2, dilation=(1, 2), bias=False),
        dict(padding="same", kernel_size=(4, 2)),  # asymmetric 'same': pre-padded
        dict(padding_mode="reflect"),
        dict(padding_mode="circular", padding=(2, 1)),
        dict(padding_mode="replicate", kernel_size=(1, 3), padding=(0, 1)),
        dict(padding="valid", kernel_size=(3, 5)),
    ],
)
def test_layer_fused_path_matches_torch_path(kwargs):
    layer = make_layer(**kwargs).eval()
    x = torch.randn(3, 6, 11, 12)
    with torch.no_grad():
        assert layer._fused_applicable(x)
        fused_out = layer(x)
        unbatched = layer(x[0])
        channels_last = layer(x.to(memory_format=torch.channels_last))
        with fused.fused_disabled():
            assert not layer._fused_applicable(x)
            torch_out = layer(x)
    assert relative_error(fused_out, torch_out) <= TOLERANCE
    assert relative_error(unbatched, torch_out[0]) <= TOLERANCE
    assert relative_error(channels_last, torch_out) <= TOLERANCE
    # Training (gradient needed) keeps the torch path and agrees.
    layer.train()
    x.requires_grad_(True)
    train_out = layer(x)
    assert not layer._fused_applicable(x)
    assert train_out.requires_grad
    assert relative_error(train_out.detach(), fused_out) <= TOLERANCE


def test_layer_path_choice():
    layer = make_layer()
    x = torch.randn(1, 6, 8, 8)
    assert not layer._fused_applicable(x)  # parameters require grad and grad mode is on
    with torch.no_grad():
        assert layer._fused_applicable(x)
        assert not layer._fused_applicable(x.double())
        layer.use_fused = False
        assert not layer._fused_applicable(x)
    layer.use_fused = True
    layer.requires_grad_(False)
    assert layer._fused_applicable(x)  # nothing needs a gradient
    with torch.inference_mode():
        assert layer._fused_applicable(x)
        out = layer(x)
    with fused.fused_disabled():
        expected = layer(x)
    assert relative_error(out, expected) <= TOLERANCE
    double_layer = make_layer().double()
    with torch.no_grad():
        assert not double_layer._fused_applicable(x.double())


def test_packed_weights_refresh_after_parameter_changes(monkeypatch):
    packs = []
    original_pack = fused.pack_weights

    def counting_pack(*args, **kwargs):
        packs.append(1)
        return original_pack(*args, **kwargs)

    monkeypatch.setattr(fused, "pack_weights", counting_pack)
    layer = make_layer()
    x = torch.randn(2, 6, 9, 9)

    def check():
        with torch.no_grad():
            out = layer(x)
            with fused.fused_disabled():
                expected = layer(x)
        assert relative_error(out, expected) <= TOLERANCE
        return out

    first = check()
    assert len(packs) == 1
    check()
    assert len(packs) == 1  # same weight version: packed once
    # An optimizer step changes the parameters in place.
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().mean().backward()
    opt.step()
    second = check()
    assert not torch.allclose(first, second)
    # load_state_dict copies into the existing parameters.
    other = make_layer()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-2.0)
    layer.load_state_dict(other.state_dict())
    packs_before = len(packs)
    third = check()
    assert len(packs) == packs_before + 1
    assert relative_error(third, other.eval()(x).detach()) <= TOLERANCE
    # Swapping .data (no version bump) is caught by the storage pointer.
    with torch.no_grad():
        layer.out_factor.data = layer.out_factor.data * 3.0
    check()
    # An in-place change of a single element.
    with torch.no_grad():
        layer.vert_factor[0, 0] += 1.0
    check()


def test_eager_fast_path_outputs_copies_and_inputs():
    layer = make_layer(stride=(2, 1), kernel_size=5).eval()
    x = torch.randn(2, 6, 11, 9)
    with torch.no_grad():
        with fused.fused_disabled():
            expected = layer(x)
        first = layer(x)  # packs the weights: later calls take the fast path
        assert layer._fused_plan is not None
        second = layer(x)
        assert first.data_ptr() != second.data_ptr()  # a fresh output every call
        second.add_(1.0)
        assert relative_error(first, expected) <= TOLERANCE
        assert first.is_contiguous() and first.dtype == torch.float32
        # Strided inputs: channels_last, a slice, an input that requires grad (grad mode off).
        wide = torch.randn(2, 6, 11, 20)
        for xi in (x.to(memory_format=torch.channels_last), wide[..., 3:12], x.clone().requires_grad_(True)):
            with fused.fused_disabled():
                want = layer(xi)
            assert relative_error(layer(xi), want) <= TOLERANCE
        # Inputs the fast path does not take go to the general path: unbatched, or a clear error.
        assert relative_error(layer(x[1]), expected[1]) <= TOLERANCE
        with pytest.raises(ValueError, match="channels"):
            layer(torch.randn(1, 5, 11, 9))
        with pytest.raises(ValueError, match="smaller than"):
            layer(torch.randn(1, 6, 1, 1))
        # An empty batch gives an empty output, as nn.Conv2d does.
        assert layer(torch.randn(0, 6, 11, 9)).shape == (0, *expected.shape[1:])
    # The packed weights are a cache: copies and pickles work and repack on use.
    for copy in (copy_module.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copy._fused_plan is None
        with torch.no_grad():
            assert relative_error(copy(x), expected) <= TOLERANCE
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert relative_error(loaded(x), expected) <= TOLERANCE


def dense_reference(layer: CPConv2d, x: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d with the layer's current reconstructed kernel (independent of any packed weights)."""
    with torch.no_grad(), fused.fused_disabled():
        return layer.to_conv()(x)


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True),
])
def test_packed_weights_refresh_after_training_steps(make_optimizer):
    # Optimizers with fused=True update parameters without bumping their version counters: the
    # training forward itself must make the next fused call repack (the layer's own plan and the
    # shared cache of cp_conv2d_fused / the custom op).
    layer = make_layer()
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        layer(x)
        cp_conv2d_fused(x, layer.factors, layer.bias, padding=1)  # an entry in the shared cache
    optimizer = make_optimizer(layer.parameters())
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
        with torch.no_grad():
            expected = dense_reference(layer, x)
            assert relative_error(layer(x), expected) <= TOLERANCE
            assert relative_error(cp_conv2d_fused(x, layer.factors, layer.bias, padding=1), expected) <= TOLERANCE


def test_packed_weights_refresh_whatever_runs_the_training_forward():
    # The fused optimizers' steps leave version counters alone; what must not matter: a no-grad
    # forward between backward() and step(), a compiled training forward (the layer's Python forward
    # never runs with gradients), parameters shared by two layers.
    torch.manual_seed(0)
    layer = make_layer()
    twin = make_layer()
    twin.out_factor, twin.in_factor = layer.out_factor, layer.in_factor  # shared parameters
    x = torch.randn(2, 6, 7, 7)
    params = {id(p): p for module in (layer, twin) for p in module.parameters()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=0.05, fused=True)
    compiled_loss = torch.compile(lambda inp: twin(inp).square().mean(), backend="eager")
    for step in range(3):
        optimizer.zero_grad()
        (layer(x).square().mean() if step % 2 == 0 else compiled_loss(x)).backward()
        with torch.no_grad():
            layer(x), twin(x)  # packs the weights of before the step
        optimizer.step()
        with torch.no_grad():
            for module in (layer, twin):
                assert relative_error(module(x), dense_reference(module, x)) <= TOLERANCE


def test_fused_threads_is_validated():
    layer = make_layer()
    layer.fused_threads = 2
    assert layer.fused_threads == 2
    for bad in (2.5, "2", -1, True, 10**12):
        with pytest.raises(ValueError, match="threads must be"):
            layer.fused_threads = bad
    assert layer.fused_threads == 2
    with pytest.raises(ValueError, match="threads must be"):
        cp_conv2d_fused(torch.randn(1, 6, 5, 5), layer.factors, layer.bias, threads=10**12)


def test_fx_symbolic_trace_records_the_torch_stages():
    layer = make_layer(stride=2, padding_mode="reflect").eval()
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        assert relative_error(traced(x), model(x)) <= TOLERANCE
    assert sum(node.target is F.conv2d for node in traced.graph.nodes) == 4


def test_export_with_grad_mode_stays_differentiable():
    layer = make_layer().eval().requires_grad_(False)  # frozen: eager would take the fused kernel
    x = torch.randn(1, 6, 7, 7)
    program = torch.export.export(layer, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("cpconv" in t for t in targets), targets
    xg = x.clone().requires_grad_(True)
    program.module()(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    layer.to_conv()(xr).sum().backward()
    assert relative_error(xg.grad, xr.grad) <= TOLERANCE


def test_data_changes_need_a_cache_clear_or_a_mode_switch():
    layer = make_layer().eval()
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        layer(x)
        layer.out_factor.data.mul_(2.0)  # not recorded by torch: documented remedies below
        fused.clear_packed_weights_cache()
        assert relative_error(layer(x), dense_reference(layer, x)) <= TOLERANCE
        layer.in_factor.data.mul_(-1.5)
        layer.eval()
        assert relative_error(layer(x), dense_reference(layer, x)) <= TOLERANCE


def test_pruned_and_parametrized_factors():
    x = torch.randn(2, 6, 7, 7)
    pruned = make_layer()
    torch.nn.utils.prune.l1_unstructured(pruned, "out_factor", amount=0.5)
    doubled = make_layer()

    class Double(torch.nn.Module):
        def forward(self, t):
            return 2.0 * t

    torch.nn.utils.parametrize.register_parametrization(doubled, "in_factor", Double())
    for layer in (pruned, doubled):
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        for _ in range(2):
            with torch.no_grad():
                got = layer(x)  # the fused path (pruning's forward pre-hook recomputes out_factor)
                expected = dense_reference(layer, x)  # the factors as that forward saw them
                assert relative_error(got, expected) <= TOLERANCE
            with fused.fused_disabled():
                assert relative_error(layer(x).detach(), expected) <= TOLERANCE  # the torch path
            optimizer.zero_grad()
            layer(x).square().mean().backward()  # gradients reach the underlying parameters
            optimizer.step()


# make_dual loads torch's jvp decompositions, which use torch.jit.script (torch's own deprecation).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_vmap_forward_ad_and_autocast_take_the_torch_path():
    layer = make_layer().eval()
    conv = layer.to_conv().eval()
    x = torch.randn(3, 6, 7, 7)
    with torch.no_grad():
        layer(x)  # packed: the fast path is armed
        out = torch.vmap(layer)(x.unsqueeze(1))  # each sample is a (1, C, H, W) batch
        assert relative_error(out.squeeze(1), conv(x)) <= TOLERANCE
    tangent = torch.randn_like(x)
    for grad_mode in (torch.enable_grad, torch.no_grad):
        with grad_mode(), torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, tangent)
            got = torch.autograd.forward_ad.unpack_dual(layer(dual))
            want = torch.autograd.forward_ad.unpack_dual(conv(dual))
            assert got.tangent is not None
            assert relative_error(got.tangent.detach(), want.tangent.detach()) <= TOLERANCE
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == conv(x).dtype == torch.bfloat16


def test_geometry_can_be_changed_after_construction():
    layer = make_layer().eval()
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        layer(x)
        layer.padding = (0, 2)
        layer.stride = 2
        layer.dilation = (1, 2)
        conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=(0, 2), dilation=(1, 2))
        conv.weight.copy_(layer.dense_weight())
        conv.bias.copy_(layer.bias)
        assert layer(x).shape == conv(x).shape
        assert relative_error(layer(x), conv(x)) <= TOLERANCE
        layer.padding, layer.padding_mode = 1, "reflect"
        # A new reference: nn.Conv2d keeps the amount of non-zero padding it computed when built.
        conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=(1, 2), padding_mode="reflect")
        conv.weight.copy_(layer.dense_weight())
        conv.bias.copy_(layer.bias)
        assert relative_error(layer(x), conv(x)) <= TOLERANCE
    assert layer.stride == (2, 2) and layer.padding == (1, 1) and "padding_mode='reflect'" in repr(layer)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        layer.stride = 0
    with pytest.raises(ValueError, match="padding_mode"):
        layer.padding_mode = "mirror"
    with pytest.raises(ValueError, match="not supported for strided"):
        layer.padding = "same"  # with stride 2, as nn.Conv2d
    assert layer.stride == (2, 2) and layer.padding == (1, 1)  # unchanged after the errors


def test_oversized_geometry_raises_instead_of_crashing():
    x = torch.randn(1, 4, 7, 7)
    for value in (2**62, 2**40):
        layer = CPConv2d(4, 4, 3, rank=4, dilation=value, padding=value)
        with torch.no_grad(), pytest.raises(ValueError, match="too large"):
            layer(x)
        with pytest.raises(ValueError, match="too large"):
            cp_conv2d_fused(x, layer.factors, layer.bias, dilation=value, padding=value)
    layer = CPConv2d(4, 4, 3, rank=4, padding=2**30)
    with torch.no_grad(), pytest.raises(ValueError, match="2\\^50"):
        layer(x)  # fits int32 per value, but the output would be astronomically large


# Importing inductor triggers torch's own deprecation of torch.jit.script_method (not ours).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_sees_the_op():
    layer = make_layer(groups=2, stride=(1, 2)).eval()
    x = torch.randn(2, 6, 10, 10)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        expected = layer(x)
        compiled = torch.compile(layer, backend=recording_backend, fullgraph=True)
        out = compiled(x)
        inductor_out = torch.compile(layer)(x)
    assert graphs and any(
        "cpconv.cp_conv2d" in str(node.target) for gm in graphs for node in gm.graph.nodes
    ), graphs[0].graph if graphs else None
    assert relative_error(out, expected) <= TOLERANCE
    assert relative_error(inductor_out, expected) <= TOLERANCE


def test_torch_export_sees_one_op():
    layer = make_layer(padding="same", kernel_size=3).eval()
    x = torch.randn(1, 6, 9, 9)
    with torch.no_grad():
        program = torch.export.export(layer, (x,))
        expected = layer(x)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("cpconv.cp_conv2d.default") == 1, targets
    assert relative_error(program.module()(x), expected) <= TOLERANCE
    # inside fused_disabled() the program holds only PyTorch's ops (it runs without cpconv)
    with torch.no_grad(), fused.fused_disabled():
        program = torch.export.export(layer, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("cpconv" in t for t in targets) and "aten.conv2d.default" in targets, targets
    assert relative_error(program.module()(x), expected) <= TOLERANCE


# torch's own deprecation of TorchScript, and its tracer's notes on the shape checks of forward().
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_keeps_the_torch_stages():
    layer = make_layer().eval()
    x = torch.randn(1, 6, 9, 9)
    with torch.no_grad():
        layer(x)  # a packed plan exists: tracing must still not take the eager kernel call
        traced = torch.jit.trace(layer, (x,))
        expected = layer(x)
        other = torch.randn(1, 6, 9, 9)
        assert relative_error(traced(other), layer(other)) <= TOLERANCE  # not a constant
    assert "cpconv::cp_conv2d" not in str(traced.graph) and "aten::_convolution" in str(traced.graph)
    assert relative_error(traced(x), expected) <= TOLERANCE


# torch's own deprecation of TorchScript.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("geometry", [
    dict(padding=1),
    dict(padding=2, padding_mode="reflect", dilation=(2, 1)),
    dict(padding="same", dilation=2, bias=False),
    dict(padding=(1, 2), padding_mode="circular", stride=(1, 2), groups=2),
    dict(stride=2, padding="valid"),
], ids=str)
def test_jit_script_compiles_the_torch_stages(geometry, tmp_path):
    torch.manual_seed(0)
    kernel = (3, 5) if geometry.get("padding_mode") == "circular" else 3
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                CPConv2d(8, 12, kernel, rank=6, **geometry), torch.nn.ReLU(),
                                CPConv2d(12, 4, 1, rank=2)).eval()
    scripted = torch.jit.script(model)
    assert all(type(m) is CPConv2d for m in (model[2], model[4]))  # the eager model is left as it was
    x = torch.randn(2, 3, 15, 17)
    with torch.no_grad():
        with fused.fused_disabled():
            expected = model(x)
        assert relative_error(scripted(x), expected) <= TOLERANCE
        assert relative_error(scripted(x[0]), expected[0]) <= TOLERANCE  # unbatched
        assert relative_error(model(x), expected) <= TOLERANCE and model[2]._fused_plan is not None  # still fused
    torch.jit.save(scripted, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    with torch.no_grad():
        assert relative_error(loaded(x), expected) <= TOLERANCE
    assert "cpconv" not in loaded.code and "cpconv" not in getattr(loaded, "2").code
    with pytest.raises(torch.jit.Error, match="CPConv2d expects 8 input channels, got 5"):
        torch.jit.script(model[2])(torch.randn(1, 5, 9, 9))
    with pytest.raises(torch.jit.Error, match="4-D .* or 3-D"):
        torch.jit.script(model[2])(torch.randn(9, 9))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_script_refuses_parametrized_factors_clearly():
    layer = make_layer()
    torch.nn.utils.prune.l1_unstructured(layer, "in_factor", amount=0.5)
    with pytest.raises(RuntimeError, match="in_factor is parametrized or pruned.*prune.remove"):
        torch.jit.script(layer)
    torch.nn.utils.prune.remove(layer, "in_factor")
    torch.jit.script(layer)


def test_forked_child_runs_the_kernel_on_one_thread():
    """libgomp cannot start a multi-threaded region in a child forked after the parent ran one: neither
    the kernel nor PyTorch's ops (which the fused path uses for some padding modes) may hang there."""
    script = textwrap.dedent("""
        import multiprocessing as mp, sys, torch, cpconv
        torch.set_num_threads(1)
        layer = cpconv.CPConv2d(16, 16, 3, rank=8, padding=1).eval()
        layer.fused_threads = 2
        padded = cpconv.CPConv2d(16, 16, 3, rank=8, padding=1, padding_mode="reflect").eval()
        x = torch.randn(3, 16, 20, 20)
        big = torch.randn(2, 64, 128, 128)  # large enough for PyTorch to use several threads
        with torch.no_grad():
            expected = layer(x)  # the parent's OpenMP pool now has a second thread
            expected_padded = padded(x)

        def child(queue):
            with torch.no_grad():  # the kernel, then PyTorch ops (F.pad of the reflect layer, a big pad)
                error = max(float((layer(x) - expected).abs().max()), float((padded(x) - expected_padded).abs().max()))
                torch.nn.functional.pad(big, (1, 1, 1, 1), mode="reflect")
                queue.put((error, torch.get_num_threads()))

        if __name__ == "__main__":
            ctx = mp.get_context("fork")
            queue = ctx.Queue()
            p = ctx.Process(target=child, args=(queue,))
            p.start()
            p.join(60)
            if p.is_alive():
                p.kill()
                sys.exit("the forked child hung")
            error, threads = queue.get(timeout=5)
            print(error, threads, p.exitcode)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    difference, threads, exitcode = out.stdout.split()
    assert float(difference) < 1e-5 and threads == "1" and exitcode == "0"


def test_single_openmp_runtime_loaded():
    libraries = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            name = path.rsplit("/", 1)[-1]
            if re.match(r"lib(g?omp|iomp5)[-.0-9a-f]*\.so", name):
                libraries.add(name)
    gomp = {name for name in libraries if name.startswith("libgomp")}
    assert len(gomp) == 1 and len(libraries) == 1, libraries
    # and a fused call runs on it with several threads.
    case = Case(1, 4, 4, 8, 1, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1), True, 5)
    check_case(case, fused.best_isa(), threads=2)


def test_function_cache_refreshes_after_in_place_change():
    fused.clear_packed_weights_cache()
    case = Case(1, 4, 6, 8, 1, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), True, 11)
    x, (U, S, Y, X), bias = make_tensors(case)
    first = cp_conv2d_fused(x, (U, S, Y, X), bias, padding=1)
    assert len(fused._PACKED_CACHE) == 1
    cp_conv2d_fused(x, (U, S, Y, X), bias, padding=1)
    assert len(fused._PACKED_CACHE) == 1
    U.mul_(2.0)  # in place: same tensor object, new version
    second = cp_conv2d_fused(x, (U, S, Y, X), bias, padding=1)
    expected = cp_conv2d_reference(x, (U, S, Y, X), bias, padding=1)
    assert relative_error(second, expected) <= TOLERANCE
    assert not torch.allclose(first, second)


def test_function_cache_entries_go_with_their_tensors():
    fused.clear_packed_weights_cache()
    x = torch.randn(1, 6, 7, 7)
    for _ in range(3):
        layer = make_layer()
        cp_conv2d_fused(x, layer.factors, layer.bias, padding=1)
        assert len(fused._PACKED_CACHE) == 1
        del layer  # its factors die: so does the cache entry, not only when 256 newer ones push it out
        assert len(fused._PACKED_CACHE) == 0
    layer = make_layer()
    for _ in range(3):  # detached copies of the factors are new tensors each call
        cp_conv2d_fused(x, tuple(f.detach().clone() for f in layer.factors), layer.bias, padding=1)
    assert len(fused._PACKED_CACHE) == 0


def test_data_swapped_twice_is_seen():
    # Two .data swaps between fused calls: the allocator may hand the second new tensor the address
    # the packed weights were made from; the packed storages are kept alive so that cannot happen.
    layer = make_layer().eval()
    x = torch.randn(1, 6, 7, 7)
    with torch.no_grad():
        for _ in range(20):
            layer(x)
            cp_conv2d_fused(x, layer.factors, layer.bias, padding=1)
            layer.out_factor.data = torch.randn_like(layer.out_factor)
            layer.out_factor.data = torch.randn_like(layer.out_factor)
            expected = dense_reference(layer, x)
            assert relative_error(layer(x), expected) <= TOLERANCE
            assert relative_error(cp_conv2d_fused(x, layer.factors, layer.bias, padding=1), expected) <= TOLERANCE
