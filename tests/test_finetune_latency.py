"""``cpconv.finetune`` / ``cpconv.accuracy`` and ``cpconv.measure_latency``."""

import pytest
import torch
from torch import nn

from cpconv import accuracy, finetune, measure_latency


def _separable(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_finetune_learns_and_restores_mode(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
    loader = torch.utils.data.DataLoader(_separable(), batch_size=32, shuffle=True)
    model.eval()
    before = accuracy(model, loader)
    losses = finetune(model, loader, epochs=8, lr=0.05 if optimizer == "sgd" else 0.01, optimizer=optimizer)
    assert len(losses) == 8 * len(loader)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8
    assert accuracy(model, loader) > max(before, 0.9)
    assert not model.training  # the caller's eval mode is back


def test_finetune_budget_and_errors():
    model = nn.Linear(6, 2)
    loader = torch.utils.data.DataLoader(_separable(), batch_size=32)
    assert len(finetune(model, loader, epochs=3, max_batches=5)) == 5
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, loader, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        finetune(model, loader, lr=0)
    with pytest.raises(ValueError, match="optimizer"):
        finetune(model, loader, optimizer="lbfgs")
    with pytest.raises(ValueError, match="max_batches"):
        finetune(model, loader, max_batches=0)
    with pytest.raises(TypeError, match="pair"):
        finetune(model, [torch.zeros(2, 6)])
    with pytest.raises(ValueError, match="diverged"):
        finetune(model, [(torch.full((2, 6), float("nan")), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(ValueError, match="no examples"):
        accuracy(model, [])


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": float("inf")}, r"lr must be a finite number > 0, got inf"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": -0.1}, "lr"),
    ({"momentum": float("inf")}, r"momentum must be a number in \[0, 1\), got inf"),
    ({"momentum": -0.5}, "momentum"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": float("nan")}, r"weight_decay must be a finite number >= 0, got nan"),
    ({"weight_decay": -1e-4}, "weight_decay"),
])
def test_finetune_rejects_bad_hyperparameters_before_touching_the_model(kwargs, match):
    model = nn.Linear(6, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(4, 6), torch.randint(0, 2, (4,)))] * 3
    with pytest.raises(ValueError, match=match):
        finetune(model, data, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finetune_one_shot_iterator_needs_one_epoch():
    model = nn.Linear(6, 2)
    data = [(torch.randn(4, 6), torch.randint(0, 2, (4,)))] * 3
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"one-shot iterator \(generator\).*epochs=2"):
        finetune(model, (b for b in data), epochs=2)
    with pytest.raises(ValueError, match="one-shot iterator"):
        finetune(model, iter(data), epochs=3)
    assert torch.equal(model.weight, before)
    assert len(finetune(model, (b for b in data), epochs=1)) == 3  # one pass over a generator is fine
    assert len(finetune(model, data, epochs=2)) == 6  # a list is re-iterable


def test_measure_latency_restores_threads_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    model.train()
    threads = torch.get_num_threads()
    stats = measure_latency(model, torch.zeros(1, 3, 16, 16), threads=1, warmup=1, repeats=7)
    assert torch.get_num_threads() == threads and model.training
    assert stats.repeats == 7 == len(stats.times_ms) and stats.threads == 1
    assert 0 < stats.min_ms <= stats.q25_ms <= stats.median_ms <= stats.q75_ms <= stats.max_ms
    with pytest.raises(ValueError, match="threads"):
        measure_latency(model, torch.zeros(1, 3, 16, 16), threads=0)
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, torch.zeros(1, 3, 16, 16), repeats=0)
    with pytest.raises(TypeError, match="example_input"):
        measure_latency(model, [1, 2])
