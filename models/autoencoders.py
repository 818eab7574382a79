"""Autoencoder networks. Every one maps windows ``[B, W, F]`` to reconstructions of the same shape."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn


class DenseAutoencoder(nn.Module):
    """Fully connected autoencoder over the flattened window: ``W*F -> hidden... -> code -> ...hidden -> W*F``."""

    def __init__(self, window: int, n_features: int, hidden: Sequence[int] = (64, 16)) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("hidden needs at least one layer size (the last one is the code size)")
        self.window, self.n_features = window, n_features
        sizes = [window * n_features, *hidden]
        encoder: list[nn.Module] = []
        for a, b in pairwise(sizes):
            encoder += [nn.Linear(a, b), nn.ReLU()]
        encoder.pop()  # linear code layer
        decoder: list[nn.Module] = []
        back = sizes[::-1]
        for a, b in pairwise(back):
            decoder += [nn.Linear(a, b), nn.ReLU()]
        decoder.pop()
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct a batch of windows."""
        batch = x.shape[0]
        code = self.encoder(x.reshape(batch, -1))
        return self.decoder(code).reshape(batch, self.window, self.n_features)


MODEL_TYPES: dict[str, type[nn.Module]] = {"dense": DenseAutoencoder}


def build_model(model_type: str, window: int, n_features: int, hyperparameters: dict[str, object]) -> nn.Module:
    """Instantiate the network registered as ``model_type``; ValueError for an unknown type."""
    try:
        cls = MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(f"unknown model type {model_type!r} (have: {', '.join(MODEL_TYPES)})") from None
    return cls(window, n_features, **hyperparameters)
