"""Reference feature statistics (mu, sigma) with their cached square root and provenance metadata.

Files:
- ``.safetensors`` (our format): tensors ``mu`` (d,) and ``sigma`` (d, d) in float64, plus string
  metadata (``format``, ``num_samples``, ``validation_fd``, ``feature_dim``, ``encoder_id``,
  ``library_version`` and any user keys such as ``resolution``, ``preprocessing``, ``dataset``, ``split``).
- ``.npz`` (pytorch-fid compatible): arrays ``mu`` and ``sigma`` only, read with ``allow_pickle=False``.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from contextlib import contextmanager
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fd_onestep.frechet import frechet_distance_from_factor, reference_factor, sqrtm_psd, validate_stats
from fd_onestep.moments import FeatureMoments

__all__ = ["ReferenceStats"]

_FORMAT = "fd_onestep.ReferenceStats"
_RESERVED = {"format", "num_samples", "validation_fd", "feature_dim"}


@contextmanager
def open_npz(path: str | os.PathLike):
    """``np.load(path, allow_pickle=False)`` as a context manager; a file that is not an ``.npz`` archive is a
    ValueError naming it (numpy's own message advises ``allow_pickle=`` / ``pickle.load``, which we never use)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{str(path)!r} is not a readable .npz archive ({type(err).__name__}); pass a "
                         "pytorch-fid / ADM statistics file written by numpy.savez (mu, sigma) or an ADM "
                         "reference batch (arr_0).") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ValueError(f"{str(path)!r} is a single .npy array, not an .npz archive; write the statistics "
                         "with numpy.savez(path, mu=mu, sigma=sigma).")
    with data:
        yield data


def write_file_atomically(path: Path, blob: bytes) -> None:
    """Write ``blob`` to ``path`` through a temp file in the same folder and a rename (created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The bytes go into a unique temp file that we create ourselves, like a plain open() would (mode
    # 0666 minus the umask): mkstemp's and safetensors' own file creation both leave 0600, which
    # would carry over to the final file through the rename.
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _library_version() -> str:
    import fd_onestep

    return str(getattr(fd_onestep, "__version__", "unknown"))


@dataclass(eq=False)
class ReferenceStats:
    """Gaussian statistics of reference features for one encoder.

    Attributes:
        mu: (d,) float64 mean.
        sigma: (d, d) float64 unbiased covariance (``numpy.cov(rowvar=False)`` convention).
        num_samples: number of features the statistics were computed from (0 if unknown).
        metadata: provenance strings (encoder_id, feature_dim, resolution, preprocessing, dataset,
            split, library_version, ...).
        validation_fd: FD of a held-out validation split against these statistics (for
            FD_r = FD / validation_fd), or None.
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    num_samples: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    validation_fd: float | None = None

    def __post_init__(self):
        mu = self.mu if isinstance(self.mu, torch.Tensor) else torch.from_numpy(np.asarray(self.mu))
        sigma = self.sigma if isinstance(self.sigma, torch.Tensor) else torch.from_numpy(np.asarray(self.sigma))
        validate_stats(mu, sigma, "reference")
        self.mu = mu.detach().to(torch.float64).cpu().contiguous()
        self.sigma = sigma.detach().to(torch.float64).cpu().contiguous()
        self.num_samples = int(self.num_samples)
        self.metadata = {str(k): str(v) for k, v in (self.metadata or {}).items()}
        self.metadata["feature_dim"] = str(self.feature_dim)
        self.metadata.setdefault("library_version", _library_version())
        if self.validation_fd is not None:
            self.validation_fd = float(self.validation_fd)
        self._device_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def feature_dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def encoder_id(self) -> str | None:
        return self.metadata.get("encoder_id")

    @functools.cached_property
    def sqrt_sigma(self) -> torch.Tensor:
        """(d, d) float64 ``A = sigma^1/2`` (symmetric PSD root via eigh), computed once (CPU)."""
        return sqrtm_psd(self.sigma)

    @functools.cached_property
    def factor(self) -> tuple[torch.Tensor, bool]:
        """``(F, lower)`` with ``F F^T = sigma`` (lower Cholesky, or ``A`` if singular), computed once (CPU).

        This is what the FD route uses; see :func:`fd_onestep.frechet.reference_factor`.
        """
        return reference_factor(self.sigma)

    @functools.cached_property
    def trace_sigma(self) -> torch.Tensor:
        """0-dim float64 ``tr(sigma)``: the FD of a generator collapsed onto the reference mean."""
        return self.sigma.diagonal().sum()

    def tensors_on(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """``(mu, F, tr(sigma), lower)`` in float64 on ``device``, cached per device (F computed once)."""
        key = str(torch.device(device))
        cached = self._device_cache.get(key)
        if cached is None:
            factor, lower = self.factor
            cached = (self.mu.to(device), factor.to(device), self.trace_sigma.to(device), lower)
            self._device_cache[key] = cached
        return cached

    def frechet_distance(self, mu_q, sigma_q) -> torch.Tensor:
        """FD between these statistics and generated ones, with the factor cached per device.

        Args:
            mu_q: (d,) generated mean (numpy or torch, any float dtype); may require grad.
            sigma_q: (d, d) generated covariance; may require grad.

        Returns:
            0-dim float64 tensor on the device of ``mu_q`` (torch input) or the CPU (numpy input),
            differentiable w.r.t. ``mu_q`` and ``sigma_q`` (:func:`~fd_onestep.frechet.frechet_distance_from_factor`).
        """
        symmetric = validate_stats(mu_q, sigma_q, "generated")
        if len(mu_q) != self.feature_dim:
            raise ValueError(
                f"feature dimensions differ: reference (encoder {self.encoder_id!r}) has "
                f"d={self.feature_dim}, generated has d={len(mu_q)}; compute the generated "
                "features with the encoder the reference statistics were made with."
            )
        device = mu_q.device if isinstance(mu_q, torch.Tensor) else torch.device("cpu")
        mu_p, factor_p, trace_sigma_p, lower = self.tensors_on(device)
        return frechet_distance_from_factor(mu_p, factor_p, trace_sigma_p, mu_q, sigma_q, lower=lower,
                                            validate=False, symmetric=symmetric)

    def relative_fd(self, fd: float) -> float:
        """FD_r = fd / validation_fd (how many times worse than a held-out real split)."""
        if not self.validation_fd:
            raise ValueError(
                "these reference statistics have no validation_fd; compute it (FD of a held-out split "
                "against these statistics) when building them, to report FD_r."
            )
        return float(fd) / self.validation_fd

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_moments(cls, moments: FeatureMoments, *, validation_fd: float | None = None, **metadata) -> "ReferenceStats":
        """Statistics from accumulated moments (unbiased covariance, like numpy.cov)."""
        if moments.count < 2:
            raise ValueError(
                f"reference statistics need at least 2 samples, the moments hold {moments.count}; "
                "accumulate more features."
            )
        return cls(
            mu=moments.mean.cpu(),
            sigma=moments.covariance(unbiased=True).cpu(),
            num_samples=moments.count,
            metadata={k: str(v) for k, v in metadata.items()},
            validation_fd=validation_fd,
        )

    @classmethod
    def from_features(cls, features, *, validation_fd: float | None = None, **metadata) -> "ReferenceStats":
        """Statistics of an (N, d) array/tensor of features (float64 accumulation)."""
        if not isinstance(features, torch.Tensor):
            features = torch.from_numpy(np.asarray(features))
        return cls.from_moments(FeatureMoments.from_features(features), validation_fd=validation_fd, **metadata)

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, encoder_id: str | None, feature_dim: int) -> None:
        """Raise ``ValueError`` unless these statistics were made with ``encoder_id`` and ``feature_dim``.

        The encoder id is compared only when both sides know it (pytorch-fid ``.npz`` files carry none).
        """
        if int(feature_dim) != self.feature_dim:
            raise ValueError(
                f"reference statistics have feature_dim={self.feature_dim} (encoder {self.encoder_id!r}) but "
                f"the encoder {encoder_id!r} gives feature_dim={feature_dim}; use statistics computed with this "
                "encoder (fd-onestep stats ...) or pick the matching encoder."
            )
        if encoder_id is not None and self.encoder_id is not None and str(encoder_id) != self.encoder_id:
            raise ValueError(
                f"reference statistics were computed with encoder {self.encoder_id!r} but the features come "
                f"from {encoder_id!r}; recompute the statistics with {encoder_id!r} (fd-onestep stats ...) "
                f"or load the encoder {self.encoder_id!r}."
            )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (atomically: temp file + rename)."""
        from safetensors.torch import save

        path = Path(path)
        meta = {k: v for k, v in self.metadata.items() if k not in _RESERVED}
        meta.update(
            format=_FORMAT,
            num_samples=str(self.num_samples),
            validation_fd="" if self.validation_fd is None else repr(float(self.validation_fd)),
            feature_dim=str(self.feature_dim),
            library_version=self.metadata.get("library_version", _library_version()),
        )
        if self.encoder_id is not None:
            meta["encoder_id"] = self.encoder_id
        write_file_atomically(path, save({"mu": self.mu.contiguous(), "sigma": self.sigma.contiguous()}, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        """Read a file written by :meth:`save` (``.npz`` files are delegated to :meth:`from_npz`)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"reference statistics file {str(path)!r} does not exist; compute it with "
                "`fd-onestep stats ...` or pass the path of an existing .safetensors/.npz file."
            )
        if path.suffix == ".npz":
            return cls.from_npz(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                keys = set(f.keys())
                if not {"mu", "sigma"} <= keys:
                    raise ValueError(
                        f"{str(path)!r} has tensors {sorted(keys)}, not 'mu' and 'sigma'; it is not a "
                        "reference statistics file (write one with ReferenceStats.save)."
                    )
                mu, sigma = f.get_tensor("mu"), f.get_tensor("sigma")
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error type for corrupt headers
            raise ValueError(
                f"could not read {str(path)!r} as safetensors ({err}); re-create it with ReferenceStats.save."
            ) from err
        num_samples = int(meta.pop("num_samples", "0") or 0)
        vfd = meta.pop("validation_fd", "")
        meta.pop("format", None)
        meta.pop("feature_dim", None)
        try:
            return cls(mu=mu, sigma=sigma, num_samples=num_samples, metadata=meta,
                       validation_fd=float(vfd) if vfd else None)
        except ValueError as err:  # NaN / Inf or inconsistent shapes: say which file
            raise ValueError(f"reference statistics file {str(path)!r}: {err}") from err

    def to_npz(self, path: str | os.PathLike, name: str | None = None) -> None:
        """Write pytorch-fid compatible statistics (``np.savez`` with float64 ``mu`` and ``sigma``).

        Beside them (pytorch-fid reads only ``mu`` and ``sigma``) the file keeps what :meth:`from_npz` needs for
        a lossless round trip: ``num_samples``, ``validation_fd`` (NaN when unknown), the metadata as a JSON
        string and ``name`` (the statistics' file stem, e.g. ``pixels-gray_16``), all plain arrays
        (``allow_pickle=False`` reads them)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extras = {"num_samples": np.asarray(self.num_samples, dtype=np.int64),
                  "validation_fd": np.asarray(np.nan if self.validation_fd is None else self.validation_fd,
                                              dtype=np.float64),
                  "metadata": np.asarray(json.dumps(self.metadata))}
        if name:
            extras["name"] = np.asarray(name)
        np.savez(path, mu=self.mu.numpy(), sigma=self.sigma.numpy(), **extras)

    @classmethod
    def from_npz(cls, path: str | os.PathLike, encoder_id: str | None = None, *,
                 num_samples: int = 0, validation_fd: float | None = None, **metadata) -> "ReferenceStats":
        """Read pytorch-fid ``.npz`` statistics (keys ``mu``, ``sigma``; ``allow_pickle=False``).

        Args:
            encoder_id: the encoder these statistics belong to (pytorch-fid files do not say; e.g.
                the Inception id of :mod:`fd_onestep.encoders`), stored in the metadata.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {str(path)!r} does not exist; pass an existing .npz path.")
        with open_npz(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(
                    f"{str(path)!r} has arrays {sorted(f.files)}; pytorch-fid statistics need 'mu' and 'sigma' "
                    "(np.savez(path, mu=mu, sigma=sigma))."
                )
            mu, sigma = f["mu"][:], f["sigma"][:]
            # what to_npz keeps beside mu and sigma (absent from pytorch-fid's own files)
            if "metadata" in f.files:
                metadata = {**json.loads(str(f["metadata"][()])), **metadata}
            if "num_samples" in f.files and not num_samples:
                num_samples = int(f["num_samples"][()])
            if "validation_fd" in f.files and validation_fd is None and np.isfinite(f["validation_fd"][()]):
                validation_fd = float(f["validation_fd"][()])
        if encoder_id is not None:
            metadata["encoder_id"] = encoder_id
        metadata.setdefault("source", str(path.name))
        try:
            return cls(mu=torch.from_numpy(np.asarray(mu, dtype=np.float64)),
                       sigma=torch.from_numpy(np.asarray(sigma, dtype=np.float64)),
                       num_samples=num_samples, metadata=metadata, validation_fd=validation_fd)
        except ValueError as err:
            raise ValueError(f"statistics file {str(path)!r}: {err}") from err

    def __repr__(self) -> str:
        return (f"ReferenceStats(feature_dim={self.feature_dim}, encoder_id={self.encoder_id!r}, "
                f"num_samples={self.num_samples}, validation_fd={self.validation_fd})")
