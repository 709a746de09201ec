"""An AlexNet-style CNN for 28x28 digits and its (cached) training."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from typing import Tuple

import torch
from torch import nn

__all__ = ["AlexNetConfig", "MnistAlexNet", "train_dense", "cache_key"]


@dataclasses.dataclass(frozen=True)
class AlexNetConfig:
    """Five convs with AlexNet's kernel-size pattern (large, 5, 3, 3, 3) and widening channels.

    AlexNet: 11x11/4 -> 96, 5x5 -> 256, 3x3 -> 384, 384, 256, with max-pooling after conv1, conv2 and
    conv5. Here, scaled to 28x28 and to a 2-core CPU: 7x7 -> 16, 5x5 -> 32, 3x3 -> 64, 64, 48; pooling
    28 -> 14 -> 7 -> 3.
    """

    channels: Tuple[int, int, int, int, int] = (16, 32, 64, 64, 48)
    kernel_sizes: Tuple[int, int, int, int, int] = (7, 5, 3, 3, 3)
    hidden: int = 128
    num_classes: int = 10
    dropout: float = 0.25


class MnistAlexNet(nn.Module):
    """``features`` (conv1..conv5 with ReLU, max-pool after conv1, conv2, conv5) then ``classifier``.

    Input (B, 1, 28, 28); output (B, num_classes) logits. Conv modules are named
    ``features.conv1`` .. ``features.conv5``.
    """

    def __init__(self, config: AlexNetConfig = AlexNetConfig()) -> None:
        super().__init__()
        self.config = config
        layers = OrderedDict()
        in_ch = 1
        for i, (out_ch, k) in enumerate(zip(config.channels, config.kernel_sizes), start=1):
            layers[f"conv{i}"] = nn.Conv2d(in_ch, out_ch, k, padding=k // 2)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            if i in (1, 2, 5):
                layers[f"pool{i}"] = nn.MaxPool2d(2)
            in_ch = out_ch
        self.features = nn.Sequential(layers)
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("dropout1", nn.Dropout(config.dropout)),
            ("fc1", nn.Linear(in_ch * 3 * 3, config.hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("dropout2", nn.Dropout(config.dropout)),
            ("fc2", nn.Linear(config.hidden, config.num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def cache_key(data_sha256: str, config: AlexNetConfig, training: dict, seed: int) -> str:
    """Hash of everything that determines the trained weights: data, model config, training settings, seed."""
    blob = json.dumps({"data": data_sha256, "config": dataclasses.asdict(config), "training": training,
                       "seed": seed, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_dense(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int,
                lr: float, seed: int, progress: bool) -> list:
    """Train with Adam on ``images``/``labels``; seeded shuffling. Returns per-epoch mean losses."""
    from ..finetune import finetune

    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch_size,
                                         shuffle=True, generator=generator)
    losses = []
    for epoch in range(epochs):
        # One-cycle-ish: a lower rate for the last epoch settles the weights.
        epoch_lr = lr if epoch < epochs - 1 or epochs == 1 else lr * 0.3
        batch_losses = finetune(model, loader, epochs=1, lr=epoch_lr, optimizer="adam", progress=progress)
        losses.append(sum(batch_losses) / len(batch_losses))
    return losses


def load_or_train(cache_dir: str, config: AlexNetConfig, images, labels, *, data_sha256: str, training: dict,
                  seed: int, progress: bool, train_kwargs: dict, log=print) -> Tuple[MnistAlexNet, bool, str]:
    """The trained dense model from ``cache_dir`` if cached under the same key, else trained and cached.

    ``training`` (with ``data_sha256``, ``config`` and ``seed``) makes the cache key; ``train_kwargs``
    go to :func:`train_dense`.

    Returns ``(model, from_cache, cache_path)``.
    """
    key = cache_key(data_sha256, config, training, seed)
    path = os.path.join(cache_dir, f"dense-alexnet-{key}.pt")
    torch.manual_seed(seed)
    model = MnistAlexNet(config)
    if os.path.isfile(path):
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model, True, path
        except Exception as exc:  # noqa: BLE001 -- a damaged cache entry is retrained, not fatal
            log(f"cache entry {path} unreadable ({exc}); training again")
            torch.manual_seed(seed)
            model = MnistAlexNet(config)
    train_dense(model, images, labels, seed=seed, progress=progress, **train_kwargs)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp-{os.getpid()}"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, False, path
