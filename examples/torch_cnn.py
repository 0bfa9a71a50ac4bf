"""A small PyTorch CNN trained on psgd's parameter server.

    psgd train --model examples.torch_cnn:make --workers 2

(run from the repository root, or put this folder on PYTHONPATH). Every process that
computes imports this module and calls ``make()``; the server gives workers only the
layout and fingerprint of the flat parameter vector.
"""

import torch.nn as nn
import torch.nn.functional as F

from psgd.torch import TorchModel


def make():
    net = nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 14 x 14
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 5 x 5
        nn.Flatten(), nn.Linear(32 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    return TorchModel(net, F.cross_entropy, input_shape=(1, 28, 28))
