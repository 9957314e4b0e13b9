"""The FID Inception-v3 network (pool3, 2048-d) from pytorch-fid, as a :class:`FeatureEncoder`.

We use pytorch-fid's own ``InceptionV3`` class and its FID weights file
(``pt_inception-2015-12-05-6726825d.pth``, the TF 2015-12-05 graph ported to PyTorch), so features
are those of ``pytorch_fid.inception.InceptionV3([3])``: same network, same weights, same
preprocessing (bilinear resize to 299 without antialiasing, ``align_corners=False``; pytorch-fid
does the resize on [0, 1] images and then maps to [-1, 1]; we do exactly the same operations).

Weights are found, in this order: ``weights_path=`` (a local file), the torch.hub cache
(``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``, default
``~/.cache/torch/hub/checkpoints``), then a download from ``FID_WEIGHTS_URL`` (unless offline).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .base import FeatureEncoder

INCEPTION_ENCODER_ID = "inception-v3-fid/pool3"
INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURE_DIM = 2048

_PATCH_LOCK = threading.Lock()


def _fid_module():
    from pytorch_fid import inception as fid_inception

    return fid_inception


def fid_weights_filename() -> str:
    """File name of the standard FID weights (the last component of pytorch-fid's URL)."""
    return os.path.basename(_fid_module().FID_WEIGHTS_URL)


def fid_weights_cache_path() -> Path:
    """Where torch.hub caches the FID weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / fid_weights_filename()


def _offline_default() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "FD_ONESTEP_OFFLINE"))


def _missing_weights_message(reason: str) -> str:
    url = _fid_module().FID_WEIGHTS_URL
    return (
        f"Could not load the FID Inception weights: {reason}\n"
        f"Provide the weights file '{fid_weights_filename()}' in one of these ways:\n"
        f"  - put it in the torch.hub cache: {fid_weights_cache_path()} "
        "(the directory is $TORCH_HOME/hub/checkpoints; TORCH_HOME defaults to ~/.cache/torch), or\n"
        f"  - pass its location: load_encoder('inception', weights_path='/path/to/{fid_weights_filename()}') "
        "(CLI: --inception_weights /path/to/file), or\n"
        f"  - download it on a connected machine from {url} (e.g. `wget {url}`) and copy it over."
    )


def _load_fid_state_dict(weights_path: Optional[str | os.PathLike], local_files_only: bool) -> dict:
    """The FID weights as a state dict, loaded with ``weights_only=True``."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_missing_weights_message(f"weights_path '{path}' does not exist."))
        return torch.load(path, map_location="cpu", weights_only=True)
    cached = fid_weights_cache_path()
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    if local_files_only:
        raise FileNotFoundError(
            _missing_weights_message(f"'{cached}' does not exist and downloads are disabled (offline mode).")
        )
    try:
        # torch.hub's loader honours $TORCH_HOME and caches the file for next time.
        return torch.hub.load_state_dict_from_url(
            _fid_module().FID_WEIGHTS_URL, map_location="cpu", progress=True, weights_only=True
        )
    except Exception as err:  # network errors come in many types (URLError, HTTPError, OSError, ...)
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise RuntimeError(
            _missing_weights_message(f"the download failed ({type(err).__name__}: {first_line}).")
        ) from None


@contextlib.contextmanager
def _fid_loader_returning(state_dict: dict):
    """Make pytorch-fid's ``fid_inception_v3()`` use an already-loaded state dict.

    pytorch-fid builds its network and loads the weights in one function that always calls
    ``load_state_dict_from_url``; we resolve the weights ourselves (local path, cache, clear
    offline errors, ``weights_only=True``) and hand them to pytorch-fid's own builder.
    """
    module = _fid_module()
    with _PATCH_LOCK:
        original = module.load_state_dict_from_url
        module.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        try:
            yield
        finally:
            module.load_state_dict_from_url = original


def build_fid_inception(
    weights_path: Optional[str | os.PathLike] = None, local_files_only: Optional[bool] = None
) -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3([3])`` with the FID weights, resize/normalize switched off.

    Returns the pytorch-fid module; its ``forward`` maps (N, 3, 299, 299) in [-1, 1] to a list with
    one (N, 2048, 1, 1) tensor.
    """
    if local_files_only is None:
        local_files_only = _offline_default()
    state_dict = _load_fid_state_dict(weights_path, local_files_only)
    module = _fid_module()
    with _fid_loader_returning(state_dict):
        try:
            net = module.InceptionV3(
                [module.InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_FEATURE_DIM]],
                resize_input=False,
                normalize_input=False,
            )
        except RuntimeError as err:
            if "state_dict" in str(err):
                raise RuntimeError(
                    f"The weights file does not match the FID Inception-v3 architecture ({str(err).splitlines()[0]}). "
                    f"Use pytorch-fid's '{fid_weights_filename()}' from {module.FID_WEIGHTS_URL}."
                ) from None
            raise
    return net


class InceptionEncoder(FeatureEncoder):
    """FID Inception-v3 pool3 features (2048-d), identical to pytorch-fid's ``InceptionV3([3])``.

    Preprocessing: images in [-1, 1] are mapped to [0, 1], resized to 299x299 with bilinear
    interpolation (``align_corners=False``, no antialiasing) and mapped back to [-1, 1] -- the
    exact operations pytorch-fid applies to its [0, 1] inputs.
    """

    name = "inception"
    feature_dim = INCEPTION_FEATURE_DIM
    input_size = INCEPTION_INPUT_SIZE
    encoder_id = INCEPTION_ENCODER_ID
    resize_mode = "bilinear"
    antialias = False

    def __init__(
        self,
        *,
        weights_path: Optional[str | os.PathLike] = None,
        local_files_only: Optional[bool] = None,
        gradient_checkpointing: bool = False,
        autocast_dtype: Optional[torch.dtype] = None,
        torch_dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device | str] = None,
        check_inputs: bool = True,
    ):
        super().__init__(autocast_dtype=autocast_dtype, check_inputs=check_inputs)
        self.net = build_fid_inception(weights_path, local_files_only)
        self.gradient_checkpointing = gradient_checkpointing
        self.net.to(device=device, dtype=torch_dtype)
        self._freeze()

    def describe_preprocessing(self) -> str:
        return "RGB [-1,1] -> [0,1] -> bilinear resize to 299 (align_corners=False, no antialias) -> [-1,1] (pytorch-fid)"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] == (self.input_size, self.input_size):
            return images
        x = (images + 1) / 2
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def _run_block(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            # Checkpoint each layer of the block: activations inside are recomputed in backward.
            for layer in block:
                x = checkpoint(layer, x, use_reentrant=False)
            return x
        return block(x)

    def extract(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for block in self.net.blocks:
            x = self._run_block(block, x)
        return x.flatten(1)
