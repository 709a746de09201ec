"""Subprocess worker for the kill-and-resume tests (run as a script, not collected by pytest).

usage: python compress_worker.py CHECKPOINT_DIR OUT_PREFIX DELAY_SECONDS

Builds a small deterministic model whose kernels carry a planted low-rank signal, compresses it with a
checkpoint folder, a fine_tune that draws random data from torch's global RNG (so a wrong RNG restore
would change the result) and sleeps DELAY_SECONDS (a window to kill the process in), and writes the
final state_dict and report to OUT_PREFIX.pt / OUT_PREFIX.json. Every fine_tune call appends its step
to OUT_PREFIX.steps.
"""

import sys
import time

import torch
from torch import nn

import cpconv


def planted_conv(c_in, c_out, k, rank, generator):
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    factors = [torch.randn(n, rank, generator=generator) for n in (c_out, c_in, k, k)]
    weight = torch.einsum("ar,br,cr,dr->abcd", *factors)
    weight = weight / weight.std() * 0.1 + 0.003 * torch.randn(weight.shape, generator=generator)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(0.01 * torch.randn(c_out, generator=generator))
    return conv


def build_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(
        planted_conv(3, 16, 3, 3, g), nn.ReLU(),
        planted_conv(16, 24, 3, 4, g), nn.ReLU(),
        planted_conv(24, 24, 3, 5, g), nn.ReLU(),
        planted_conv(24, 16, 3, 3, g), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def main():
    checkpoint_dir, out_prefix, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    model = build_model()
    target = torch.randn(8, 4, generator=torch.Generator().manual_seed(7))
    probe = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(8))

    def fine_tune(m, step):
        with open(out_prefix + ".steps", "a") as f:
            f.write(f"{step}\n")
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(3):
            x = torch.randn(8, 3, 8, 8)  # global RNG: resumed runs must restore it
            loss = ((m(x) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        time.sleep(delay)

    def evaluate(m):
        with torch.no_grad():
            return float(((m(probe) - target) ** 2).mean())

    report = cpconv.compress(model, fine_tune=fine_tune, evaluate=evaluate, checkpoint_dir=checkpoint_dir,
                             input_shape=(3, 8, 8), progress=False, seed=0)
    torch.save(model.state_dict(), out_prefix + ".pt")
    report.save(out_prefix + ".json")


if __name__ == "__main__":
    main()
