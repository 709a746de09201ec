"""cpconv: compress trained CNNs with CP-decomposed convolutions and run them fast on CPU.

Import torch before the C++ core: torch ships its own OpenMP runtime (libgomp.so.1), and loading it
first makes the extension bind to that same runtime instead of loading a second one.
"""

import torch  # noqa: F401  (must precede _core, see above)

from . import _core  # noqa: F401
from .cp_conv import CPConv2d
from .reference import cp_conv2d_reference
from .checkpoint import CheckpointError
from .compress import compress
from .finetune import accuracy, finetune
from .latency import LatencyStats, measure_latency
from .report import CompressionReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "CPConv2d", "cp_conv2d_reference", "__version__",
    "compress", "CompressionReport", "LayerReport", "CheckpointError",
    "finetune", "accuracy", "measure_latency", "LatencyStats",
]
