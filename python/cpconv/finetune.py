"""``finetune`` and ``accuracy``: a small, correct training loop and its evaluation counterpart.

For users who have no training loop of their own to hand to :func:`cpconv.compress`::

    compress(model, fine_tune=lambda m, step: finetune(m, train_loader, epochs=1),
             evaluate=lambda m: accuracy(m, test_loader))
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterator
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

__all__ = ["finetune", "accuracy"]

OPTIMIZERS = ("sgd", "adam")


def _model_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _split_batch(batch, where: str):
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError(f"{where}: each batch must be a pair (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def finetune(
    model: nn.Module,
    loader: Iterable,
    *,
    epochs: int = 1,
    lr: float = 0.01,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    max_batches: Optional[int] = None,
    device=None,
    progress: bool = False,
) -> List[float]:
    """Train ``model`` on ``loader`` for ``epochs`` passes; the loss of every batch.

    Parameters
    ----------
    model
        Trained in train mode; its previous mode (train/eval) is restored afterwards.
    loader
        Re-iterable collection of ``(inputs, targets)`` batches (a ``DataLoader``, a list); iterated
        once per epoch. A one-shot iterator (a generator) is accepted with ``epochs=1`` only: it would
        be exhausted after the first epoch.
    epochs
        Passes over ``loader`` (>= 1).
    lr, momentum, weight_decay
        Optimiser settings: ``lr`` finite and > 0, ``momentum`` in [0, 1) (used by SGD only),
        ``weight_decay`` finite and >= 0.
    optimizer
        ``"sgd"`` (with momentum) or ``"adam"``; a fresh optimiser each call.
    loss_fn
        ``loss_fn(outputs, targets)``; default cross-entropy (classification logits).
    max_batches
        Stop after this many batches in total (a fixed fine-tuning budget), or ``None``.
    device
        Where the batches go; default the device of the model's parameters.
    progress
        A tqdm bar over the batches.

    Returns
    -------
    list of float
        The training loss of each batch, in order.

    Raises
    ------
    ValueError
        ``epochs < 1``, ``lr`` not finite and > 0, ``momentum`` outside [0, 1), ``weight_decay`` not
        finite and >= 0, unknown optimiser, ``max_batches < 1``, a one-shot iterator with
        ``epochs > 1`` (all checked before the model is touched); a non-finite loss.
    TypeError
        A batch that is not an ``(inputs, targets)`` pair.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if (isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real)
            or not (weight_decay >= 0 and math.isfinite(weight_decay))):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be an int >= 1 or None, got {max_batches!r}")
    if epochs > 1 and isinstance(loader, Iterator):
        raise ValueError(
            f"loader is a one-shot iterator ({type(loader).__name__}), exhausted after the first of the "
            f"epochs={epochs}: pass a re-iterable loader (a DataLoader, a list of batches) or epochs=1")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    dev = _model_device(model, device)
    loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    batches = itertools.chain.from_iterable(loader for _ in range(int(epochs)))
    if max_batches is not None:
        batches = itertools.islice(batches, int(max_batches))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = max_batches
        if total is None and hasattr(loader, "__len__"):
            total = len(loader) * int(epochs)
        bar = tqdm(total=total, desc="fine-tune", unit="batch", leave=False)
    losses: List[float] = []
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            inputs, targets = _split_batch(batch, "finetune")
            inputs, targets = inputs.to(dev), targets.to(dev)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            if not torch.isfinite(loss):
                raise ValueError(f"fine-tuning diverged: loss {loss.item()} at batch {len(losses)} (lower lr={lr})")
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return losses


def accuracy(model: nn.Module, loader: Iterable, *, device=None) -> float:
    """Fraction of ``(inputs, targets)`` examples whose arg-max output equals the target, in [0, 1].

    Runs in eval mode under ``torch.inference_mode`` (the model's mode is restored).

    Raises
    ------
    ValueError
        An empty loader.
    """
    dev = _model_device(model, device)
    was_training = model.training
    correct = total = 0
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                inputs, targets = _split_batch(batch, "accuracy")
                predicted = model(inputs.to(dev)).argmax(dim=1)
                correct += int((predicted == targets.to(dev)).sum())
                total += int(targets.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("accuracy: the loader yielded no examples")
    return correct / total
