"""FID of two image folders: ours equals pytorch-fid's ``calculate_fid_given_paths``.

Random FID-Inception weights in a temporary torch.hub cache; both implementations read the same
files, the same weights, and compute the same statistics (float64 mean, unbiased covariance).
With 10 images per folder the 2048-d covariances are rank-deficient (rank 9): scipy's ``sqrtm``
stays finite there (so pytorch-fid adds no eps offset) and both give the same trace term.
"""

import numpy as np
import pytest
from PIL import Image

from fd_onestep.dataset_stats import compute_reference_stats
from fd_onestep.encoders import load_encoder
from fd_onestep.encoders.testing import save_random_fid_inception_weights
from fd_onestep.evaluation import evaluate_folder

N_PER_FOLDER = 10


def _folder(path, seed, shift):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(N_PER_FOLDER):
        pixels = np.clip(rng.normal(128 + shift, 60, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path / f"{i:02d}.png")
    return path


def test_fd_of_two_image_folders_equals_pytorch_fid(tmp_path, monkeypatch, capsys):
    from pytorch_fid.fid_score import calculate_fid_given_paths

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    save_random_fid_inception_weights(tmp_path / "torch_home")
    generated = _folder(tmp_path / "generated", seed=1, shift=-20)
    real = _folder(tmp_path / "real", seed=2, shift=20)

    expected = calculate_fid_given_paths([str(generated), str(real)], batch_size=N_PER_FOLDER, device="cpu",
                                         dims=2048, num_workers=0)
    assert "adding" not in capsys.readouterr().out  # pytorch-fid's eps-offset fallback did not kick in

    encoders = {"inception": load_encoder("inception")}
    reference = compute_reference_stats(encoders, images_dir=real, batch_size=N_PER_FOLDER, show_progress=False)
    ours = evaluate_folder(generated, encoders, reference, batch_size=N_PER_FOLDER, show_progress=False)
    fd = ours.representations["inception"].fd
    assert expected > 0
    assert abs(fd - expected) / expected <= 1e-4, (fd, expected)
