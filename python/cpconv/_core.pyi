"""Type stubs for the C++ extension cpconv._core (torch-free kernels on NumPy float buffers).

Each submodule is one capability; the public, validating API is the pure-Python layer in cpconv.*.
"""

from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Pair = Tuple[int, int]

class _Reference(ModuleType):
    def cp_conv2d(self, x: F32, in_factor: F32, vert_factor: F32, horz_factor: F32, out_factor: F32,
                  bias: Optional[F32], y: F32, stride: Pair, padding: Pair, dilation: Pair, groups: int) -> None: ...

class _CPALS(ModuleType):
    def cp_als(self, x: npt.NDArray[Any], init_factors: Sequence[npt.NDArray[Any]], max_iter: int, tol: float,
               line_search: bool, l2_reg: float, num_threads: int) -> Dict[str, Any]: ...
    def unfolding_gram(self, x: npt.NDArray[Any], mode: int) -> F64: ...
    def relative_error(self, x: npt.NDArray[Any], weights: F64, factors: Sequence[npt.NDArray[Any]],
                       num_threads: int) -> float: ...

class _VBMF(ModuleType):
    def evbmf(self, singular_values: F64, rows: int, cols: int, frobenius_sq: float) -> Dict[str, Any]: ...
    def vbmf(self, singular_values: F64, rows: int, cols: int, frobenius_sq: float, prior: float,
             sigma2: float) -> Dict[str, Any]: ...
    def tau_bar(self, alpha: float) -> float: ...

class PackedWeights:
    """CP factors packed for the fused kernel (opaque)."""

class _Fused(ModuleType):
    PackedWeights: type
    def pack(self, in_factor: F32, vert_factor: F32, horz_factor: F32, out_factor: F32, bias: Optional[F32],
             groups: int) -> PackedWeights: ...
    def cp_conv2d(self, x: F32, packed: PackedWeights, y: F32, stride: Pair, padding: Pair, dilation: Pair,
                  threads: int, isa: str, profile: bool = False) -> Optional[Tuple[float, float, float]]: ...
    def forward(self, x: npt.NDArray[Any], packed: PackedWeights, stride: Pair, padding: Pair, dilation: Pair,
                threads: int) -> F32: ...
    def best_isa(self) -> str: ...
    def ran_multithreaded(self) -> bool: ...
    def supported_isas(self) -> List[str]: ...

reference: _Reference
cp_als: _CPALS
vbmf: _VBMF
fused: _Fused
