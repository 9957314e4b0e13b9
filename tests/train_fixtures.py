"""Shared fixtures of the training-script tests: tiny teachers, tiny encoders and their reference statistics.

Everything is built from configs (no downloads) once per test session into pytest's base temp dir, and
the script is run on it the way a user runs it (``python train_scripts/train_fd_onestep.py ...`` or
``accelerate launch ...``) in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tiny_teachers import train_teacher as build_teacher  # the training-script teachers live with the others

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "train_scripts" / "train_fd_onestep.py"

# A subprocess environment: offline, one CPU thread per process (the 2 cores are shared), quiet.
SUBPROCESS_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
    "DIFFUSERS_VERBOSITY": "error",
    "ACCELERATE_DISABLE_RICH": "1",
}

# Arguments every CI run uses: a handful of steps, tiny batches, small validation.
FAST_ARGS = [
    "--max_train_steps", "2",
    "--train_batch_size", "4",
    "--learning_rate", "1e-4",
    "--lr_scheduler", "constant",
    "--lr_warmup_steps", "0",
    "--fd_warmup_samples", "16",
    "--sample_batch_size", "16",
    "--validation_steps", "0",
    "--num_validation_images", "4",
    "--num_validation_samples", "16",
    "--report_to", "none",
    "--seed", "0",
]


# ----------------------------------------------------------------------------------------------- encoders
def _real_images(n: int, seed: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    """Smooth random 'real' images in [-1, 1] (blurred noise), (n, channels, size, size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return torch.tanh(x)


def build_encoders_and_stats(root: Path) -> dict:
    """Tiny DINOv2 + SigLIP (+ a held-out tiny SigLIP) saved locally, and ReferenceStats for each."""
    from fd_onestep.encoders import load_encoder
    from fd_onestep.encoders.testing import save_tiny_dinov2, save_tiny_siglip
    from fd_onestep.conditioning_metrics import ClassConditionalMoments, ClassConditionalStats
    from fd_onestep.reference_stats import ReferenceStats

    folders = {
        "dinov2": save_tiny_dinov2(root / "tiny-dinov2", image_size=28, hidden_size=16),
        "siglip": save_tiny_siglip(root / "tiny-siglip", image_size=16, hidden_size=16),
        "siglip_eval": save_tiny_siglip(root / "tiny-siglip-eval", image_size=16, hidden_size=8, seed=1),
    }
    out = {"encoders": {}, "stats": {}}
    train_images, val_images = _real_images(256, 0), _real_images(128, 1)
    for name, folder in folders.items():
        encoder = load_encoder(str(folder))
        with torch.no_grad():
            feats = encoder(train_images).double()
            val_feats = encoder(val_images).double()
        stats = ReferenceStats.from_features(feats, encoder_id=encoder.encoder_id, dataset="tiny-random", split="train")
        val_fd = float(stats.frechet_distance(val_feats.mean(0), torch.cov(val_feats.T)))
        stats.validation_fd = val_fd
        path = root / f"{name}.safetensors"
        stats.save(path)
        # per-class statistics next to it (labels i % 10): the joint FD-loss and per-class FD find them there
        labels = torch.arange(train_images.shape[0]) % 10
        class_stats = ClassConditionalStats.from_moments(
            ClassConditionalMoments(encoder.feature_dim, 10).update(feats, labels), encoder_id=encoder.encoder_id)
        class_stats.save(root / f"{name}.classes.safetensors")
        out["encoders"][name] = str(folder)
        out["stats"][name] = str(path)
    return out


def build_all(root: Path) -> dict:
    """Teachers + encoders + stats under ``root`` (skipped if already built in this session)."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    root.mkdir(parents=True, exist_ok=True)
    teachers = {}
    for family in ("unet2d", "unet2d_class", "dit", "sd", "sd3", "sdxl", "sana", "qwenimage", "zimage"):
        path = root / "teachers" / family
        build_teacher(family).save_pretrained(path)
        teachers[family] = str(path)
    data = {"teachers": teachers, **build_encoders_and_stats(root / "encoders")}
    prompts = root / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green cat\n")
    data["prompts_file"] = str(prompts)
    captions = root / "captions"
    captions.mkdir(exist_ok=True)
    with open(captions / "train.jsonl", "w") as f:
        for caption in ("a small dog", "two cats", "a big house", "the sea"):
            f.write(json.dumps({"text": caption}) + "\n")
    data["captions_dataset"] = str(captions)
    manifest.write_text(json.dumps(data, indent=2))
    return data


def encoder_args(assets: dict, names=("dinov2", "siglip")) -> list[str]:
    return ["--encoders", *[assets["encoders"][n] for n in names],
            "--reference_stats", *[assets["stats"][n] for n in names]]


def run_script(args: list[str], *, launcher: list[str] | None = None, timeout: int = 600, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the training script in a subprocess; on failure the assertion shows its output."""
    cmd = [*(launcher or [sys.executable]), str(SCRIPT), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**SUBPROCESS_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-12000:]}")
    return proc


def accelerate_launch(num_processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", "1"]
    if num_processes > 1:
        launcher.append("--multi_gpu")
    return launcher
