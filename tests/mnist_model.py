"""A small AlexNet-style CNN trained on a few hundred real MNIST digits (seconds), shared by tests."""

import torch

from cpconv.demo.alexnet import AlexNetConfig, MnistAlexNet, train_dense
from cpconv.demo.digits import load_digits, stratified_split

SMALL = AlexNetConfig(channels=(8, 16, 32, 32, 24), hidden=32)


def small_trained_alexnet():
    """(model, train dataset, test dataset): 40 training and 15 test digits per class, 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels = load_digits()
        train_idx, test_idx = stratified_split(labels, seed=0)
        train_idx = torch.cat([train_idx[labels[train_idx] == c][:40] for c in range(10)])
        test_idx = torch.cat([test_idx[labels[test_idx] == c][:15] for c in range(10)])
        torch.manual_seed(0)
        model = MnistAlexNet(SMALL)
        train_dense(model, images[train_idx], labels[train_idx], epochs=5, batch_size=32, lr=3e-3, seed=0,
                    progress=False)
    finally:
        torch.set_num_threads(threads)
    train = torch.utils.data.TensorDataset(images[train_idx], labels[train_idx])
    test = torch.utils.data.TensorDataset(images[test_idx], labels[test_idx])
    return model, train, test
