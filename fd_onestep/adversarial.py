"""An optional adversarial term beside FD-loss: a small discriminator head on frozen encoder features.

FD-loss matches the first two moments of the generated features to the data's; a discriminator head on the
same frozen features (real: features of real images, fake: the generator's) gives each sample its own signal
about everything beyond them. The head is tiny (an MLP on d features) and lives in float32; its parameters and
its optimizer's state are part of the training state (``state_dict``), so a resumed run continues bit for bit.

Losses (``D`` the head's logit):

- hinge: ``L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))]``, ``L_G = -E[D(fake)]``;
- non-saturating: ``L_D = E[softplus(-D(real))] + E[softplus(D(fake))]``, ``L_G = E[softplus(-D(fake))]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ADVERSARIAL_LOSSES", "discriminator_loss", "generator_loss", "FeatureDiscriminator"]

ADVERSARIAL_LOSSES = ("hinge", "nonsaturating")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The head's loss, a scalar, from its logits (N,) on real and (M,) on generated features (float32)."""
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if kind == "nonsaturating":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; use one of {ADVERSARIAL_LOSSES}.")


def generator_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The generator's adversarial loss, a scalar, from the head's logits (M,) on its samples' features."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; use one of {ADVERSARIAL_LOSSES}.")


class FeatureDiscriminator(torch.nn.Module):
    """MLP head ``d -> hidden -> 1`` (LeakyReLU 0.2) on encoder features, float32, with its own AdamW.

    ``real_features`` (N, d) are the real images' features in the same encoder, kept on the CPU (they are
    proportional to the data set); each :meth:`discriminator_step` moves one drawn batch of them to the device.
    Created on ``device`` (the process's); under several processes ``reduce`` (e.g. ``accelerator.reduce``
    with ``reduction="mean"``) averages the head's gradients, so every process keeps the same head.
    """

    def __init__(self, feature_dim: int, real_features: torch.Tensor, *, hidden: int = 256, kind: str = "hinge",
                 learning_rate: float = 1e-4, betas=(0.0, 0.99), device=None, seed: int = 0):
        super().__init__()
        if kind not in ADVERSARIAL_LOSSES:
            raise ValueError(f"unknown adversarial loss {kind!r}; use one of {ADVERSARIAL_LOSSES}.")
        if real_features.ndim != 2 or real_features.shape[1] != feature_dim or real_features.shape[0] < 2:
            raise ValueError(f"real features must be (N >= 2, {feature_dim}), got {tuple(real_features.shape)}.")
        self.kind = kind
        with torch.random.fork_rng(devices=[]):  # the head's init must not move the run's global random stream
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(torch.nn.Linear(feature_dim, hidden), torch.nn.LeakyReLU(0.2),
                                           torch.nn.Linear(hidden, 1))
        self.net.to(device=device, dtype=torch.float32)
        self.real_features = real_features.detach().to("cpu", torch.float32).contiguous()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=learning_rate, betas=betas, weight_decay=0.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B,) float32 of features (B, d) (any float dtype)."""
        return self.net(features.float()).squeeze(-1)

    def generator_loss(self, fake_features: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial loss on its batch's features (gradient to the generator only: the head's
        gradients from it are discarded by the next :meth:`discriminator_step`)."""
        return generator_loss(self(fake_features), self.kind)

    def discriminator_step(self, fake_features: torch.Tensor, rng: torch.Generator, reduce=None) -> float:
        """One AdamW step of the head on the step's (detached) generated features (M, d) and as many real ones,
        drawn with ``rng`` (the run's checkpointed sampling generator, so a resumed run draws the same)."""
        device = next(self.net.parameters()).device
        index = torch.randint(0, self.real_features.shape[0], (fake_features.shape[0],), generator=rng)
        real = self.real_features[index].to(device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = discriminator_loss(self(real), self(fake_features.detach()), self.kind)
        loss.backward()
        if reduce is not None:
            for p in self.net.parameters():
                p.grad = reduce(p.grad)
        self.optimizer.step()
        return float(loss.detach())

    def training_state(self) -> dict:
        """The head's weights and its optimizer's state (nested tensors and scalars, for ``save_state_file``)."""
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_training_state(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
