"""cpconv: compress trained CNNs with CP-decomposed convolutions and run them fast on CPU.

Import torch before the C++ core: torch ships its own OpenMP runtime (libgomp.so.1), and loading it
first makes the extension bind to that same runtime instead of loading a second one.
"""

import torch  # noqa: F401  (must precede _core, see above)
import scipy_openblas32  # noqa: F401  (loads libscipy_openblas.so, the BLAS _core's cp_als links to)

from . import _core  # noqa: F401
from .cp_als import CPALS, CPALSResult, cp_als
from .cp_conv import CPConv2d
from .fused import cp_conv2d_fused
from .rank_selection import RankSelection, RatioNotMetWarning, max_cp_rank, select_rank
from .reference import cp_conv2d_reference
from .vbmf import VBMFResult, evbmf, evbmf_tau_bar, vbmf
from .checkpoint import CheckpointError
from .compress import compress, load_compressed_state_dict
from .finetune import accuracy, finetune
from .latency import LatencyStats, measure_latency
from .report import CompressionReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "CPALS",
    "CPALSResult",
    "CPConv2d",
    "RankSelection",
    "VBMFResult",
    "cp_als",
    "cp_conv2d_fused",
    "cp_conv2d_reference",
    "evbmf",
    "evbmf_tau_bar",
    "max_cp_rank",
    "select_rank",
    "RatioNotMetWarning",
    "vbmf",
    "__version__",
    "compress",
    "load_compressed_state_dict",
    "CompressionReport",
    "LayerReport",
    "CheckpointError",
    "finetune",
    "accuracy",
    "measure_latency",
    "LatencyStats",
]
