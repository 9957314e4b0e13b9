"""The training script's library (``train_scripts/train_fd_onestep.py``), one module per concern.

- :mod:`~fd_onestep.training.checkpoints`: atomic ``accelerator.save_state`` checkpoints, ``latest``, pruning;
- :mod:`~fd_onestep.training.run_args`: saved arguments without secrets, the run fingerprint, list arguments;
- :mod:`~fd_onestep.training.state`: extra training state as safetensors + JSON (no pickle), RNG, progress;
- :mod:`~fd_onestep.training.hub`: Hub token checks and upload;
- :mod:`~fd_onestep.training.model_card`: the rendered and checked model card.

Everything here is independent of the model family, so it is tested without training anything.
"""
