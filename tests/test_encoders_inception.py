"""Specification of the Inception (FID) encoder: pytorch-fid's network, weights file and preprocessing.

Random weights with the FID network's layout are saved under the standard file name into a
temporary torch.hub cache ($TORCH_HOME/hub/checkpoints), so that pytorch-fid's own loader and ours
both load them without network. Inception-v3 on CPU is slow: few, small images.
"""

import pytest
import torch

from fd_onestep.encoders import INCEPTION_ENCODER_ID, load_encoder
from fd_onestep.encoders.testing import save_random_fid_inception_weights


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    save_random_fid_inception_weights(home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def inception(torch_home):
    return load_encoder("inception")


def test_inception_is_pool3_2048d_at_299_with_a_stable_id(inception):
    assert (inception.name, inception.feature_dim, inception.input_size) == ("inception", 2048, 299)
    assert inception.encoder_id == INCEPTION_ENCODER_ID == "inception-v3-fid/pool3"
    assert all(not p.requires_grad for p in inception.parameters())


def test_features_equal_pytorch_fid_inception_v3_pool3_for_the_same_weights_and_input(inception):
    from pytorch_fid.inception import InceptionV3

    reference = InceptionV3([3]).eval()  # pytorch-fid's own loader reads the hub cache
    images01 = torch.rand(3, 3, 37, 53)  # pytorch-fid's input convention: [0, 1], any size
    with torch.no_grad():
        expected = reference(images01)[0].flatten(1)
        ours = inception(images01 * 2 - 1)
    assert expected.abs().max() > 0.1  # meaningful magnitudes, not a vacuous comparison
    assert (ours - expected).abs().max().item() <= 1e-5


def test_weights_path_loads_a_local_file_without_the_hub_cache(torch_home, tmp_path, monkeypatch):
    weights = torch_home / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache
    encoder = load_encoder("inception", weights_path=weights)
    reference = load_encoder("inception", weights_path=weights)
    with torch.no_grad():
        images = torch.rand(1, 3, 64, 64) * 2 - 1
        assert torch.equal(encoder(images), reference(images))


def test_missing_weights_offline_name_the_file_the_url_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_encoder("inception", local_files_only=True)
    message = str(info.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "weights_path" in message


def test_missing_weights_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path .* does not exist"):
        load_encoder("inception", weights_path=tmp_path / "nope.pth")


def test_gradients_reach_input_pixels_and_checkpointing_does_not_change_them(torch_home, inception):
    checkpointed = load_encoder("inception", gradient_checkpointing=True)
    gray = torch.rand(1, 1, 24, 24) * 2 - 1  # grayscale: converted to RGB, not rejected
    grads = []
    for encoder in (inception, checkpointed):
        images = gray.clone().requires_grad_(True)
        (encoder(images) ** 2).sum().backward()
        grads.append(images.grad)
    assert grads[0].abs().sum() > 0 and torch.isfinite(grads[0]).all()
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_images_in_0_255_are_rejected_before_the_network_runs(inception):
    with pytest.raises(ValueError, match="127.5"):
        inception(torch.full((1, 3, 8, 8), 200.0))
