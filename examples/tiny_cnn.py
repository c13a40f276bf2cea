"""The bundled example model: a tiny seeded CNN classifier built in code (no download, no committed weights).

    mpack convert examples.tiny_cnn:make_model --input pixels:batch,3,32,32:float32 -o tiny_cnn.onnx
"""

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels).flatten(1))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()
