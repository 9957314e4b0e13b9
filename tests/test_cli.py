"""Specification of the `fd-onestep` command line (stats, evaluate, import-npz, export-npz)."""

import json

import numpy as np
import pytest
from PIL import Image

from fd_onestep.cli import build_parser, main
from fd_onestep.encoders.testing import save_tiny_siglip
from fd_onestep.reference_stats import ReferenceStats


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("validation", 8)):
        (root / "data" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "data" / split / f"{i}.png")
    (root / "generated").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 128, (32, 32, 3), dtype=np.uint8)).save(root / "generated" / f"{i}.png")
    save_tiny_siglip(root / "tiny-siglip")
    return root


@pytest.mark.parametrize("command", ["stats", "evaluate", "import-npz", "export-npz"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: fd-onestep " + command in capsys.readouterr().out


def test_stats_then_evaluate_writes_stats_prints_a_table_and_saves_json(workspace, capsys):
    model = str(workspace / "tiny-siglip")
    out = workspace / "stats"
    assert main(["stats", "--encoders", model, f"{model}@mean", "--dataset", str(workspace / "data"), "--split", "train",
                 "--validation_split", "validation", "--batch_size", "5", "--output_dir", str(out), "--npz"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["tiny-siglip.npz", "tiny-siglip.safetensors", "tiny-siglip_mean.npz", "tiny-siglip_mean.safetensors"]
    ref = ReferenceStats.load(out / "tiny-siglip.safetensors")
    assert ref.num_samples == 12 and ref.validation_fd is not None and ref.metadata["split"] == "train"
    capsys.readouterr()

    results = workspace / "results.json"
    # stats files in the other order: matched to encoders by encoder id
    assert main(["evaluate", "--images", str(workspace / "generated"), "--encoders", model, f"{model}@mean",
                 "--reference_stats", str(out / "tiny-siglip_mean.safetensors"), str(out / "tiny-siglip.safetensors"),
                 "--output", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "| representation |" in printed and "FD_r^2" in printed
    data = json.loads(results.read_text())
    assert data["num_samples"] == 8 and data["k"] == 2
    rep = data["representations"]["tiny-siglip"]
    assert rep["fd_r"] == pytest.approx(rep["fd"] / rep["validation_fd"])


def test_mismatched_reference_stats_exit_with_a_clear_message(workspace, capsys):
    model = str(workspace / "tiny-siglip")
    out = workspace / "stats_mean"
    assert main(["stats", "--encoders", f"{model}@mean", "--images_dir", str(workspace / "data" / "train"),
                 "--output_dir", str(out)]) == 0
    code = main(["evaluate", "--images", str(workspace / "generated"), "--encoders", model,
                 "--reference_stats", str(out / "tiny-siglip_mean.safetensors")])
    assert code == 2
    err = capsys.readouterr().err
    assert "siglip:tiny-siglip:mean:32" in err and "siglip:tiny-siglip:pooler:32" in err


def test_unknown_encoder_exits_with_the_known_names(workspace, capsys):
    code = main(["stats", "--encoders", "incepshun", "--images_dir", str(workspace / "generated"), "--output_dir", str(workspace / "x")])
    assert code == 2
    assert "Unknown encoder 'incepshun'" in capsys.readouterr().err


def test_empty_dataset_exits_with_a_clear_message(tmp_path, workspace, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["stats", "--encoders", str(workspace / "tiny-siglip"), "--images_dir", str(tmp_path / "empty"),
                 "--output_dir", str(tmp_path / "out")])
    assert code == 2 and "No images found" in capsys.readouterr().err


def test_import_and_export_npz(tmp_path, capsys):
    np.savez(tmp_path / "fid_stats.npz", mu=np.arange(4.0), sigma=np.eye(4))
    assert main(["import-npz", str(tmp_path / "fid_stats.npz"), "--output_dir", str(tmp_path / "stats")]) == 0
    (path,) = (tmp_path / "stats").glob("*.safetensors")
    assert ReferenceStats.load(path).encoder_id == "inception-v3-fid/pool3"
    assert main(["export-npz", str(path), str(tmp_path / "back.npz")]) == 0
    with np.load(tmp_path / "back.npz", allow_pickle=False) as data:
        assert np.array_equal(data["mu"], np.arange(4.0)) and np.array_equal(data["sigma"], np.eye(4))


def test_parser_requires_a_source_for_stats():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stats", "--encoders", "inception", "--output_dir", "x"])
