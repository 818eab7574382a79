"""Autoencoder networks. Every one maps windows ``[B, W, F]`` to reconstructions of the same shape.

Contract shared by every registered type (see ``Autoencoder``):
- ``forward(x)`` is the deterministic reconstruction used for scoring (inference mode, no noise, no sampling);
- ``training_loss(x)`` is the objective ``fit`` minimises: reconstruction MSE of (optionally) corrupted inputs against
  the clean windows (denoising, ``noise_std``) plus ``regularization`` (sparse L1/KL on the code, contractive Jacobian
  penalty) or, for the VAE, the negative ELBO;
- the constructor takes ``(window, n_features, **hyperparameters)`` with JSON-friendly values, so a bundle's
  metadata (``model_type`` + ``hyperparameters``) rebuilds it with ``build_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as fn
from torch import nn

Sparsity = Literal["l1", "kl"]


class Autoencoder(nn.Module):
    """Base class: ``encode`` to a code ``[B, C]`` (or ``[B, C, L]``), ``decode`` back to ``[B, W, F]``.

    Regularisation options (all off by default, valid for every subclass):
    ``noise_std``: Gaussian corruption of the (standardised) inputs while training; the target stays clean.
    ``sparsity_weight`` with ``sparsity="l1"`` (mean absolute code) or ``"kl"`` (KL divergence between
    ``sparsity_target`` and the mean sigmoid activation of each code unit over the batch).
    ``contractive_weight``: squared Frobenius norm of the encoder Jacobian d code / d input, estimated without bias by
    one random vector-Jacobian product per batch (Hutchinson), so it works for any encoder.
    """

    def __init__(self, window: int, n_features: int, *, noise_std: float = 0.0, sparsity_weight: float = 0.0,
                 sparsity: Sparsity = "l1", sparsity_target: float = 0.05, contractive_weight: float = 0.0) -> None:
        super().__init__()
        if window < 2 or n_features < 1:
            raise ValueError("window must be >= 2 and n_features >= 1")
        if noise_std < 0 or sparsity_weight < 0 or contractive_weight < 0:
            raise ValueError("noise_std, sparsity_weight and contractive_weight must be >= 0")
        if sparsity not in ("l1", "kl") or not 0 < sparsity_target < 1:
            raise ValueError("sparsity must be 'l1' or 'kl' with 0 < sparsity_target < 1")
        self.window, self.n_features = window, n_features
        self.noise_std, self.sparsity_weight, self.sparsity = noise_std, sparsity_weight, sparsity
        self.sparsity_target, self.contractive_weight = sparsity_target, contractive_weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``[B, W, F]`` -> code."""
        raise NotImplementedError

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Code -> reconstruction ``[B, W, F]``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction of a batch of windows."""
        return self.decode(self.encode(x))

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """The training input: ``x`` plus Gaussian noise when ``noise_std > 0`` and in training mode."""
        if self.training and self.noise_std > 0:
            return x + self.noise_std * torch.randn_like(x)
        return x

    def regularization(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """The penalty added to the reconstruction loss for inputs ``x`` (which require grad when contractive)."""
        penalty = code.new_zeros(())
        if self.sparsity_weight > 0:
            flat = code.reshape(code.shape[0], -1)
            if self.sparsity == "l1":
                penalty = penalty + self.sparsity_weight * flat.abs().mean()
            else:
                rho_hat = torch.sigmoid(flat).mean(dim=0).clamp(1e-6, 1 - 1e-6)
                rho = self.sparsity_target
                kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
                penalty = penalty + self.sparsity_weight * kl.sum()
        if self.contractive_weight > 0:
            probe = torch.randn_like(code)
            (vjp,) = torch.autograd.grad(code, x, grad_outputs=probe, create_graph=True)
            penalty = penalty + self.contractive_weight * vjp.pow(2).sum() / x.shape[0]
        return penalty

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean reconstruction error of the (corrupted) batch against the clean ``x``, plus the regularisation."""
        inputs = self.corrupt(x)
        if self.contractive_weight > 0:
            inputs = inputs.detach().requires_grad_(True)
        code = self.encode(inputs)
        return fn.mse_loss(self.decode(code), x) + self.regularization(inputs, code)


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for a, b in pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.pop()
    return nn.Sequential(*layers)


class DenseAutoencoder(Autoencoder):
    """Fully connected autoencoder over the flattened window: ``W*F -> hidden... -> code -> ...hidden -> W*F``."""

    def __init__(self, window: int, n_features: int, hidden: Sequence[int] = (64, 16), **options: object) -> None:
        super().__init__(window, n_features, **options)  # type: ignore[arg-type]
        if not hidden:
            raise ValueError("hidden needs at least one layer size (the last one is the code size)")
        sizes = [window * n_features, *hidden]
        self.encoder = _mlp(sizes)
        self.decoder = _mlp(sizes[::-1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.reshape(x.shape[0], -1))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code).reshape(code.shape[0], self.window, self.n_features)


class SparseAutoencoder(DenseAutoencoder):
    """Dense autoencoder with a sparsity penalty on the code (L1 by default, ``sparsity="kl"`` for KL)."""

    def __init__(self, window: int, n_features: int, hidden: Sequence[int] = (64, 16), *,
                 sparsity_weight: float = 1e-3, **options: object) -> None:
        super().__init__(window, n_features, hidden, sparsity_weight=sparsity_weight, **options)


class ContractiveAutoencoder(DenseAutoencoder):
    """Dense autoencoder with a contractive penalty (squared Frobenius norm of the encoder Jacobian)."""

    def __init__(self, window: int, n_features: int, hidden: Sequence[int] = (64, 16), *,
                 contractive_weight: float = 1e-3, **options: object) -> None:
        super().__init__(window, n_features, hidden, contractive_weight=contractive_weight, **options)


class LstmAutoencoder(Autoencoder):
    """LSTM encoder-decoder: the encoder's last hidden state is projected to a code of ``code_size``; the decoder
    LSTM reads the code repeated at every step and a linear layer maps its outputs back to the sensors."""

    def __init__(self, window: int, n_features: int, lstm_hidden: int = 32, lstm_layers: int = 1,
                 code_size: int = 16, **options: object) -> None:
        super().__init__(window, n_features, **options)  # type: ignore[arg-type]
        if lstm_hidden < 1 or lstm_layers < 1 or code_size < 1:
            raise ValueError("lstm_hidden, lstm_layers and code_size must be >= 1")
        self.encoder = nn.LSTM(n_features, lstm_hidden, num_layers=lstm_layers, batch_first=True)
        self.to_code = nn.Linear(lstm_hidden, code_size)
        self.decoder = nn.LSTM(code_size, lstm_hidden, num_layers=lstm_layers, batch_first=True)
        self.output = nn.Linear(lstm_hidden, n_features)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.encoder(x)
        return self.to_code(hidden[-1])

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        steps, _ = self.decoder(code.unsqueeze(1).expand(-1, self.window, -1))
        return self.output(steps)


class ConvAutoencoder(Autoencoder):
    """1-D convolutional autoencoder over time: stride-2 convolutions halve the window per layer (``conv_channels``
    gives each layer's channels, the last being the code channels); transposed convolutions double it back, the
    result is cropped to the window and a 1x1 convolution maps it to the sensors."""

    def __init__(self, window: int, n_features: int, conv_channels: Sequence[int] = (32, 16), kernel_size: int = 7,
                 **options: object) -> None:
        super().__init__(window, n_features, **options)  # type: ignore[arg-type]
        if not conv_channels or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError("conv_channels needs at least one layer and kernel_size must be odd")
        pad = kernel_size // 2
        encoder: list[nn.Module] = []
        for a, b in pairwise([n_features, *conv_channels]):
            encoder += [nn.Conv1d(a, b, kernel_size, stride=2, padding=pad), nn.ReLU()]
        encoder.pop()
        decoder: list[nn.Module] = []
        back = [*conv_channels[::-1], conv_channels[0]]
        for a, b in pairwise(back):
            decoder += [nn.ConvTranspose1d(a, b, kernel_size, stride=2, padding=pad, output_padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)
        self.output = nn.Conv1d(conv_channels[0], n_features, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.transpose(1, 2))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.output(self.decoder(code)[..., : self.window]).transpose(1, 2)


class VariationalAutoencoder(Autoencoder):
    """Dense variational autoencoder. Trained on the negative ELBO (MSE reconstruction + ``beta`` x KL to N(0, I),
    with the KL averaged per input value so ``beta`` is comparable across window shapes); scored by reconstructing the
    posterior mean, so scores are deterministic."""

    def __init__(self, window: int, n_features: int, hidden: Sequence[int] = (64, 16), beta: float = 1.0,
                 **options: object) -> None:
        super().__init__(window, n_features, **options)  # type: ignore[arg-type]
        if not hidden:
            raise ValueError("hidden needs at least one layer size (the last one is the latent size)")
        if beta < 0:
            raise ValueError("beta must be >= 0")
        self.beta = beta
        sizes = [window * n_features, *hidden]
        self.encoder = nn.Sequential(_mlp(sizes[:-1]), nn.ReLU()) if len(sizes) > 2 else nn.Identity()
        width = sizes[-2]
        self.mean = nn.Linear(width, sizes[-1])
        self.log_var = nn.Linear(width, sizes[-1])
        self.decoder = _mlp(sizes[::-1])

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x)."""
        hidden = self.encoder(x.reshape(x.shape[0], -1))
        return self.mean(hidden), self.log_var(hidden).clamp(-10.0, 10.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code).reshape(code.shape[0], self.window, self.n_features)

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.corrupt(x)
        if self.contractive_weight > 0:
            inputs = inputs.detach().requires_grad_(True)
        mean, log_var = self.posterior(inputs)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var)
        recon = fn.mse_loss(self.decode(z), x)
        kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(dim=1).mean() / (self.window * self.n_features)
        return recon + self.beta * kl + self.regularization(inputs, mean)


MODEL_TYPES: dict[str, type[Autoencoder]] = {
    "dense": DenseAutoencoder,
    "lstm": LstmAutoencoder,
    "conv": ConvAutoencoder,
    "sparse": SparseAutoencoder,
    "contractive": ContractiveAutoencoder,
    "vae": VariationalAutoencoder,
}


def build_model(model_type: str, window: int, n_features: int, hyperparameters: dict[str, object]) -> Autoencoder:
    """Instantiate the network registered as ``model_type``; ValueError for an unknown type or hyperparameter."""
    try:
        cls = MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(f"unknown model type {model_type!r} (have: {', '.join(MODEL_TYPES)})") from None
    try:
        return cls(window, n_features, **hyperparameters)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValueError(f"model type {model_type!r}: bad hyperparameters ({exc})") from None
