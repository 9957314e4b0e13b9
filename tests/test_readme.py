"""The README is a product page that stays true: its first screen shows the install, a quickstart on a real model and
the supported families; every flag its commands pass exists in the training script or the `fd-onestep` CLI; and
neither it nor docs/ narrates how the work went."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

from fd_onestep.pipelines.pipeline_fd_onestep import FAMILY_ADAPTERS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _commands(text: str) -> list[str]:
    """The shell commands of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def _options(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _flags(command: str) -> list[str]:
    words = shlex.split(re.sub(r"<[^>]*>", "X", command).replace("...same arguments...", ""))
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


def test_the_first_screen_has_the_install_the_quickstart_on_a_real_model_and_the_families():
    first = "\n".join(README.read_text().splitlines()[:60])
    assert 'pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]"' in first
    assert "python -m pytest -q" in first
    ci = (ROOT / ".ci" / "run").read_text()  # the README's install and test commands are what CI runs
    assert 'pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]"' in ci and "python -m pytest -q" in ci
    assert "fd-onestep stats" in first and "accelerate launch train_scripts/train_fd_onestep.py" in first
    assert "--pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5" in first
    assert "load_lora_weights" in first and "stock_pipeline" in first
    assert "## Supported model families" in first
    for family in FAMILY_ADAPTERS:  # every registered family has its row
        assert f"| `{family}` |" in first, f"the README's supported-families table has no row for {family!r}"


def test_every_flag_of_the_readme_commands_exists():
    spec = importlib.util.spec_from_file_location("train_fd_onestep", ROOT / "train_scripts" / "train_fd_onestep.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from fd_onestep.cli import build_parser

    train = _options(script.build_parser())
    from accelerate.commands.launch import launch_command_parser

    accelerate_launch = _options(launch_command_parser())
    cli = build_parser()
    subcommands = next(a for a in cli._actions if a.dest == "command").choices
    checked = 0
    for command in _commands(README.read_text()):
        if "train_fd_onestep.py" in command:
            known = train | accelerate_launch  # the flags before the script are accelerate launch's own
        elif command.startswith("fd-onestep "):
            known = _options(subcommands[command.split()[1]])
        else:
            continue
        unknown = [flag for flag in _flags(command) if flag not in known]
        assert not unknown, f"README command uses unknown flags {unknown}: {command}"
        checked += 1
    assert checked >= 10


def test_readme_and_docs_carry_no_diary():
    pages = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text().lower()
        for word in ("sitting", "sessions so far", "development machine"):
            assert word not in text, f"{page.name} says {word!r}"


def test_docs_hold_pages_and_pictures_and_results_hold_the_records():
    assert {p.suffix for p in (ROOT / "docs").iterdir()} <= {".md", ".png"}
    index = (ROOT / "results" / "README.md").read_text()
    for record in sorted((ROOT / "results").rglob("*")):
        if record.is_file() and record.name != "README.md":
            assert record.relative_to(ROOT / "results").as_posix() in index, f"results/README.md omits {record.name}"


def test_the_real_size_table_is_the_record_of_its_plans():
    """Every row of the README's real-size table is a row of results/real_size_plans.json (what
    benchmarks/real_size_table.py wrote), figure for figure, and every record row is in the table."""
    import json

    record = json.loads((ROOT / "results" / "real_size_plans.json").read_text())
    text = (ROOT / "README.md").read_text()
    table = re.findall(r"^\| [^|]+ \| (\d+) \| (LoRA|full) \| (none|all) \| ([\d.]+) \| ([\d.]+) \| (\d+|none fits) \| "
                       r"([\d.]+) \|$", text, re.M)
    expected = [(str(r["resolution"]), "LoRA" if r["lora"] else "full", "all" if r["savers"] else "none",
                 f"{r['peak_b1'] / 1e9:.1f}", f"{r['peak_b8'] / 1e9:.1f}", str(r["max_batch_80gb"] or "none fits"),
                 f"{r['sharded_8gpu_b1'] / 1e9:.1f}") for r in record["rows"]]
    assert len(record["rows"]) >= 44 and sorted(table) == sorted(expected)
