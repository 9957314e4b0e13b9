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
    assert main(["import-npz", str(tmp_path / "fid_stats.npz"), "--output_dir", str(tmp_path / "stats"),
                 "--encoder_id", "inception"]) == 0
    (path,) = (tmp_path / "stats").glob("*.safetensors")
    assert ReferenceStats.load(path).encoder_id == "inception-v3-fid/pool3"
    assert main(["export-npz", str(path), str(tmp_path / "back.npz")]) == 0
    with np.load(tmp_path / "back.npz", allow_pickle=False) as data:
        assert np.array_equal(data["mu"], np.arange(4.0)) and np.array_equal(data["sigma"], np.eye(4))


def test_parser_requires_a_source_for_stats():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stats", "--encoders", "inception", "--output_dir", "x"])


def test_import_npz_without_encoder_id_is_an_error_naming_the_choices(tmp_path, capsys):
    np.savez(tmp_path / "stats.npz", mu=np.arange(4.0), sigma=np.eye(4))
    code = main(["import-npz", str(tmp_path / "stats.npz"), "--output_dir", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "--encoder_id is required" in err and "--encoder_id inception" in err and "inception-v3-fid/pool3" in err
    assert "encoder you will evaluate with" in err and "--encoders" in err
    # any other id is stored as given: it must be the id of the encoder the statistics are compared with
    assert main(["import-npz", str(tmp_path / "stats.npz"), "--output_dir", str(tmp_path / "out"),
                 "--encoder_id", "siglip:tiny-siglip:pooler:32"]) == 0
    (path,) = (tmp_path / "out").glob("*.safetensors")
    assert ReferenceStats.load(path).encoder_id == "siglip:tiny-siglip:pooler:32"


def _mixed_size_folder(root):
    folder = root / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, side in enumerate((32, 32, 24, 32)):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_evaluate_rejects_images_of_mixed_sizes_naming_two_files_and_the_fix(workspace, tmp_path, capsys):
    model = str(workspace / "tiny-siglip")
    out = tmp_path / "stats"
    assert main(["stats", "--encoders", model, "--images_dir", str(workspace / "data" / "train"),
                 "--output_dir", str(out)]) == 0
    folder = _mixed_size_folder(tmp_path)
    capsys.readouterr()
    args = ["evaluate", "--images", str(folder), "--encoders", model, "--reference_stats", str(out / "tiny-siglip.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "0.png' is 32x32" in err and "2.png' is 24x24" in err and "--resolution" in err
    assert main(args + ["--resolution", "32", "--output", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["num_samples"] == 4 and data["metadata"]["resolution"] == "32"


def test_evaluate_resolution_is_for_image_folders_only(workspace, capsys):
    code = main(["evaluate", "--pipeline", str(workspace), "--encoders", "pixels:8", "--reference_stats", "x.safetensors",
                 "--resolution", "32"])
    assert code == 2 and "--resolution applies to --images" in capsys.readouterr().err


def test_pipeline_options_with_images_are_an_error_not_ignored(workspace, capsys):
    code = main(["evaluate", "--images", str(workspace / "generated"), "--encoders", "pixels:8", "--reference_stats",
                 "x.safetensors", "--prompts_file", "p.txt", "--num_classes", "10"])
    assert code == 2
    assert "--num_classes, --prompts_file only apply to --pipeline" in capsys.readouterr().err


def test_invalid_pipeline_kwargs_are_a_clear_error_before_loading(workspace, capsys):
    for text, message in (("{bad", "--pipeline_kwargs is not valid JSON"), ("[1]", "must be a JSON object")):
        code = main(["evaluate", "--pipeline", str(workspace / "nowhere"), "--encoders", "pixels:8",
                     "--reference_stats", "x.safetensors", "--pipeline_kwargs", text])
        assert code == 2 and message in capsys.readouterr().err


def test_stats_output_dir_that_is_a_file_fails_before_any_image_is_read(workspace, tmp_path, capsys, monkeypatch):
    import fd_onestep.dataset_stats

    def must_not_run(*args, **kwargs):
        raise AssertionError("images were encoded before the output folder was checked")

    monkeypatch.setattr(fd_onestep.dataset_stats, "compute_reference_stats", must_not_run)
    (tmp_path / "taken").write_text("a file")
    for output_dir in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        code = main(["stats", "--encoders", "pixels:8", "--images_dir", str(workspace / "generated"),
                     "--output_dir", str(output_dir)])
        assert code == 2
        err = capsys.readouterr().err
        assert "--output_dir" in err and "is a file" in err and "Traceback" not in err


def test_evaluate_output_that_is_a_folder_fails_before_evaluating(workspace, tmp_path, capsys, monkeypatch):
    import fd_onestep.evaluation

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated before the output path was checked")

    monkeypatch.setattr(fd_onestep.evaluation, "evaluate_folder", must_not_run)
    code = main(["evaluate", "--images", str(workspace / "generated"), "--encoders", "pixels:8",
                 "--reference_stats", "x.safetensors", "--output", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--output" in err and "is a folder" in err and "results.json" in err


@pytest.mark.parametrize("option", ["--batch_size", "--resolution", "--max_samples"])
def test_sizes_must_be_positive_integers(option, capsys):
    with pytest.raises(SystemExit) as info:
        main(["stats", "--encoders", "pixels:8", "--images_dir", "x", "--output_dir", "y", option, "0"])
    assert info.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err


def test_stats_names_an_unreadable_image_or_skips_and_counts_it(workspace, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes((workspace / "generated" / f"{i}.png").read_bytes())
    (folder / "2.png").write_bytes((folder / "2.png").read_bytes()[:60])  # truncated
    args = ["stats", "--encoders", "pixels:8", "--images_dir", str(folder), "--output_dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2.png" in err and "--skip_unreadable_images" in err and "Traceback" not in err
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        assert main(args + ["--skip_unreadable_images"]) == 0
    out = capsys.readouterr().out
    assert ": 3 images" in out and "1 unreadable image(s) skipped" in out
    (path,) = (tmp_path / "out").glob("*.safetensors")
    stats = ReferenceStats.load(path)
    assert stats.num_samples == 3 and str(stats.metadata["skipped_unreadable_images"]) == "1"
