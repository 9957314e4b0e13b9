"""fd-onestep: one-step generators from diffusion models by FD-loss."""

__version__ = "0.1.0"
