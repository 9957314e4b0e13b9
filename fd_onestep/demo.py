"""``fd-onestep demo``: a one-step generator in a web page (Gradio), and the same page as a Hugging Face Space.

    fd-onestep demo RUN                      # a training run's output dir, a LoRA dir, or a Hub id
    fd-onestep demo RUN --with_teacher       # also the teacher's multi-step image beside it, with its time

The page has a prompt box (text-to-image models) or a class picker (class-conditional models), a seed, the
guidance scale where the model has guidance, and a live mode that regenerates as the user types. It shows the
one-step image with the milliseconds its pipeline call took, and optionally the teacher's multi-step image with
its own time. The model is loaded once (``fd_onestep.evaluation.load_pipeline``, the loader of ``fd-onestep
evaluate``); requests of every user go through one Gradio queue, one generation at a time.

Nothing leaves the machine: Gradio's analytics are switched off (``GRADIO_ANALYTICS_ENABLED=False``) before
Gradio is imported, the page uses no web fonts, and the server listens on 127.0.0.1 unless told otherwise.

:func:`write_space` writes the same app as a Space folder (``app.py``, ``requirements.txt``, ``README.md`` with
the Space's front matter); :func:`publish_space` uploads it, or says where it stays when the Hub is unreachable.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import RunError

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_SPACE_FOLDER",
    "DemoModel",
    "load_demo_model",
    "build_demo",
    "launch_demo",
    "add_demo_parser",
    "run_demo_command",
    "space_run",
    "write_space",
    "DemoSpace",
    "prepare_space",
    "publish_space",
]

# Where the training script writes the Space: <output_dir>/space (app.py runs the run it sits in).
DEMO_SPACE_FOLDER = "space"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
TEACHER_SAMPLERS = ("dpmsolver++", "ddim", "own")
# an example prompt for the page (digits-text models read it as the digit seven)
_EXAMPLE_PROMPT = "a handwritten seven"
_INSTALL_HINT = "pip install 'fd-onestep[demo]'"


def _import_gradio():
    """Gradio, imported with its telemetry off (set before the import: Gradio reads it at import and launch)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio as gr
    except ImportError:
        raise RunError(f"the demo needs Gradio, an optional dependency: {_INSTALL_HINT}") from None
    return gr


# ------------------------------------------------------------------------------------------------ the model
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DemoModel:
    """The one-step pipeline of a run, loaded once, and optionally its teacher's multi-step sampler.

    ``generate`` / ``generate_teacher`` take the page's inputs (a prompt or a class label, a seed, a guidance
    scale) and return ``(PIL image, milliseconds of the call)``. Calls of each model are serialized by its own lock
    (the page's queue already runs one at a time per model; the locks also cover direct calls): the student and
    the teacher, two separate pipelines, may run at the same time.
    """

    pipe: Any
    source: str
    teacher: Any = None
    teacher_source: Optional[str] = None
    teacher_steps: int = 20
    teacher_sampler: str = "dpmsolver++"

    def __post_init__(self):
        self._lock = threading.Lock()
        self._teacher_lock = threading.Lock()

    # what the page asks for
    @property
    def conditioning(self) -> str:
        if self.pipe.is_text_conditional:
            return "text"
        return "class" if self.pipe.is_class_conditional else "unconditional"

    @property
    def class_choices(self) -> list[tuple[str, int]]:
        return [(str(i), i) for i in range(self.pipe.num_classes or 0)]

    @property
    def has_guidance(self) -> bool:
        """Text models (a negative prompt) and class models with a null class take a guidance scale."""
        if self.conditioning == "text":
            return True
        return self.conditioning == "class" and self.pipe.config.null_class_label is not None

    @property
    def default_guidance(self) -> float:
        return float(self.pipe.config.guidance_scale)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of a generated image."""
        _, h, w = self.pipe.image_shape()
        return int(h), int(w)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def describe(self) -> str:
        h, w = self.image_size
        return f"{self.pipe.family} one-step generator, {self.conditioning}, {w}x{h} ({self.source})"

    def _condition(self, condition) -> dict:
        if self.conditioning == "text":
            return {"prompt": [str(condition or "")]}
        if self.conditioning == "class":
            label = int(condition)
            if not 0 <= label < self.pipe.num_classes:
                raise ValueError(f"class {label} is out of range: this model has classes 0..{self.pipe.num_classes - 1}.")
            return {"class_labels": [label]}
        return {"batch_size": 1}

    def _generator(self, seed) -> torch.Generator:
        # noise drawn on the CPU: a seed gives the same image on every device
        return torch.Generator("cpu").manual_seed(int(seed))

    def generate(self, condition=None, seed: int = 0, guidance_scale: Optional[float] = None):
        """The one-step image and the milliseconds of the pipeline call (noise, text encoding, one forward, decode)."""
        kwargs = self._condition(condition)
        if self.has_guidance and guidance_scale is not None:
            kwargs["guidance_scale"] = float(guidance_scale)
        with self._lock, torch.inference_mode():
            _synchronize(self.device)
            start = time.perf_counter()
            image = self.pipe(**kwargs, generator=self._generator(seed), output_type="pil").images[0]
            _synchronize(self.device)
            return image, 1000 * (time.perf_counter() - start)

    def generate_teacher(self, condition=None, seed: int = 0, guidance_scale: Optional[float] = None):
        """The teacher's multi-step image (``teacher_steps`` steps of ``teacher_sampler``) and its milliseconds."""
        if self.teacher is None:
            raise ValueError("this demo was started without the teacher: pass --with_teacher (or --teacher PATH).")
        g = self.default_guidance if guidance_scale is None or not self.has_guidance else float(guidance_scale)
        with self._teacher_lock, torch.inference_mode():
            _synchronize(self.device)
            start = time.perf_counter()
            image = self.teacher(condition, self._generator(seed), g)
            _synchronize(self.device)
            return image, 1000 * (time.perf_counter() - start)


def _recorded_teacher(run: Path) -> Optional[str]:
    """The teacher a run was trained from, as the run recorded it (LoRA info or the run's arguments)."""
    from .evaluation import LORA_INFO_FILE
    from .training.run_args import RUN_ARGS_FILE

    if (run / LORA_INFO_FILE).is_file():
        return json.loads((run / LORA_INFO_FILE).read_text()).get("base_model")
    if (run / RUN_ARGS_FILE).is_file():
        return json.loads((run / RUN_ARGS_FILE).read_text()).get("args", {}).get("pretrained_model_name_or_path")
    return None


def _teacher_callable(teacher, model: DemoModel, steps: int, sampler: str) -> Callable:
    """``(condition, generator, guidance) -> PIL image`` for a multi-step diffusers pipeline: a ``DDPMPipeline``
    (unconditional or class-conditional UNet: :func:`fd_onestep.comparison.generators.teacher_sampler`), a
    ``DiTPipeline`` (class labels) or a text-to-image pipeline (prompts), at the one-step pipeline's image size."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel
    from diffusers.image_processor import VaeImageProcessor

    from .comparison.generators import teacher_sampler

    unet = getattr(teacher, "unet", None)
    if isinstance(unet, UNet2DModel):
        null = model.pipe.config.null_class_label
        own = "ddpm" if sampler == "own" else sampler
        cache: dict = {}

        def run_unet(condition, generator, guidance):
            key = float(guidance) if model.conditioning == "class" else 1.0
            if key not in cache:  # one sampler per guidance scale (it checks the scale once)
                cache[key] = teacher_sampler(teacher, steps, own, guidance_scale=max(key, 1.0),
                                             null_class_label=null if key > 1 else None)
            labels = [int(condition)] if model.conditioning == "class" else None
            images = cache[key](1, generator, labels)
            return VaeImageProcessor().postprocess(images.float().cpu(), output_type="pil")[0]

        return run_unet

    if sampler != "own" and hasattr(teacher.scheduler, "alphas_cumprod"):  # DDPM-style teachers only
        cls = {"dpmsolver++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}[sampler]
        teacher.scheduler = cls.from_config(teacher.scheduler.config)
    if type(teacher).__name__ == "DiTPipeline":
        def run_dit(condition, generator, guidance):
            return teacher(class_labels=[int(condition)], guidance_scale=guidance, generator=generator,
                           num_inference_steps=steps).images[0]

        return run_dit

    height, width = model.image_size

    def run_text(condition, generator, guidance):
        return teacher(str(condition or ""), guidance_scale=guidance, generator=generator, num_inference_steps=steps,
                       height=height, width=width).images[0]

    return run_text


def _resolve_run(run: str, *, cache_dir=None, local_files_only=None) -> str:
    """A local folder as is; a Hub id of a LoRA run (``fd_onestep_lora.json``) downloaded to the HF cache first
    (its LoRA and info only), since the loader reads a LoRA's base from that file; other Hub ids as is."""
    from .evaluation import LORA_INFO_FILE, LORA_WEIGHTS_FILE

    if Path(run).expanduser().exists() or run.count("/") != 1:
        return run
    from huggingface_hub import hf_hub_download, snapshot_download

    kwargs = {k: v for k, v in (("cache_dir", cache_dir), ("local_files_only", local_files_only)) if v is not None}
    try:
        hf_hub_download(run, LORA_INFO_FILE, **kwargs)
    except Exception:  # noqa: BLE001 - not a LoRA repo (or not reachable): the loader names the problem
        return run
    return snapshot_download(run, allow_patterns=[LORA_INFO_FILE, LORA_WEIGHTS_FILE], **kwargs)


def load_demo_model(
    run: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: Optional[torch.dtype] = None,
    with_teacher: bool = False,
    teacher: Optional[str] = None,
    teacher_steps: int = 20,
    teacher_sampler: str = "dpmsolver++",
    cache_dir=None,
    local_files_only: Optional[bool] = None,
) -> DemoModel:
    """Load a run's one-step pipeline for the demo (once), and its teacher when asked.

    Args:
        run: a training run's output dir (a whole pipeline, or a LoRA with ``fd_onestep_lora.json``), a folder
            saved by ``FDOneStepPipeline.save_pretrained``, or a Hub id of either.
        device: default CUDA when available, else the CPU. ``dtype``: weights dtype (default float32; e.g.
            ``torch.float16`` on a GPU).
        with_teacher: also load the teacher's multi-step pipeline: ``teacher`` if given, else the one the run
            recorded (the LoRA's base model, or the run's ``--pretrained_model_name_or_path``).
        teacher_steps / teacher_sampler: its sampling: ``dpmsolver++`` or ``ddim`` built ``from_config`` of a
            DDPM-style teacher's scheduler (as the training comparison does), or ``own`` (its own scheduler;
            flow-matching teachers always use their own).
    Raises ``ValueError`` for a multi-step pipeline given as ``run`` or a teacher that cannot be found, and
    ``FileNotFoundError`` (the loader's) for a run that cannot be loaded.
    """
    from diffusers import DiffusionPipeline

    from .evaluation import load_pipeline
    from .pipelines.pipeline_fd_onestep import FDOneStepPipeline

    if teacher_steps < 1:
        raise ValueError(f"--teacher_steps must be >= 1, got {teacher_steps}.")
    if teacher_sampler not in TEACHER_SAMPLERS:
        raise ValueError(f"--teacher_sampler must be one of {', '.join(TEACHER_SAMPLERS)}, got {teacher_sampler!r}.")
    run = str(run)
    hub = {k: v for k, v in (("cache_dir", cache_dir), ("local_files_only", local_files_only)) if v is not None}
    local = _resolve_run(run, **hub)
    teacher_source = teacher
    if (with_teacher or teacher) and teacher_source is None:
        teacher_source = _recorded_teacher(Path(local)) if Path(local).is_dir() else None
        if teacher_source is None:
            raise ValueError(f"'{run}' does not record its teacher (no fd_onestep_lora.json nor "
                             "fd_onestep_run_args.json): pass it with --teacher PATH_OR_HUB_ID.")
    pipe = load_pipeline(local, **hub)
    if not isinstance(pipe, FDOneStepPipeline):
        raise ValueError(
            f"'{run}' is a multi-step {type(pipe).__name__}, not a one-step generator: pass a training run's output "
            "dir or LoRA dir, or a folder saved from FDOneStepPipeline (FDOneStepPipeline.from_teacher(teacher)"
            ".save_pretrained(dir) gives the teacher's naive one step)."
        )
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device=device, dtype=dtype) if dtype is not None else pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    model = DemoModel(pipe=pipe, source=run, teacher_steps=teacher_steps, teacher_sampler=teacher_sampler)
    # one generation before the first user's: lazy initializations do not count in the page's milliseconds
    model.generate(0 if model.conditioning == "class" else "", 0)
    if teacher_source is not None:
        try:
            stock = DiffusionPipeline.from_pretrained(str(teacher_source), **hub)
        except Exception as err:  # noqa: BLE001 - rephrased with the fix
            raise ValueError(f"could not load the teacher '{teacher_source}' ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); pass it with --teacher "
                             "PATH_OR_HUB_ID, or drop --with_teacher.") from None
        stock.to(device=device, dtype=dtype) if dtype is not None else stock.to(device)
        stock.set_progress_bar_config(disable=True)
        model.teacher = _teacher_callable(stock, model, teacher_steps, teacher_sampler)
        model.teacher_source = str(teacher_source)
    return model


# ------------------------------------------------------------------------------------------------ the page
# small images (a 16x16 digit) fill their frame, without blur
_CSS = """
.fd-onestep-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""


def _ms(ms: float, what: str) -> str:
    return f"**{what}: {ms:.1f} ms**"


def build_demo(model: DemoModel, *, title: Optional[str] = None, live: bool = True):
    """The Gradio page (``gr.Blocks``) of a :class:`DemoModel`.

    Inputs: ``prompt`` (text models) or ``class`` (class models), ``seed``, ``guidance`` (models with guidance),
    ``live`` (regenerate on every change) and, with a teacher, ``show teacher``. Outputs: the one-step image and
    its milliseconds; the teacher's image and its milliseconds. API (``gradio_client`` or HTTP
    ``/gradio_api/call/generate``): ``generate(condition, seed, guidance) -> (image, milliseconds text)`` and,
    with a teacher, ``generate_teacher`` likewise; the condition is absent for unconditional models and the
    guidance for models without it.
    """
    gr = _import_gradio()

    height, width = model.image_size
    display = max(256, min(512, 16 * max(height, width)))
    title = title or "fd-onestep: one step"
    condition_input = guidance_input = None
    # every image shown is a file in Gradio's cache: those older than an hour are deleted every hour
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# {title}\n{model.describe()}. One denoiser forward per image"
                    + (f"; beside it the teacher, {model.teacher_sampler} {model.teacher_steps} steps." if model.teacher
                       else "."))
        with gr.Row():
            with gr.Column(scale=1):
                if model.conditioning == "text":
                    condition_input = gr.Textbox(label="Prompt", value=_EXAMPLE_PROMPT, lines=1, max_lines=3,
                                                 elem_id="prompt")
                elif model.conditioning == "class":
                    condition_input = gr.Dropdown(choices=model.class_choices, value=0, label="Class", elem_id="class")
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                if model.has_guidance:
                    guidance_input = gr.Slider(1.0, 10.0, value=max(1.0, model.default_guidance), step=0.5,
                                               label="Guidance scale", elem_id="guidance")
                live_box = gr.Checkbox(value=live, label="Live: regenerate as you type", elem_id="live")
                show_teacher = gr.Checkbox(value=model.teacher is not None, label="Show the teacher", elem_id="teacher",
                                           visible=model.teacher is not None)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                image = gr.Image(label="One step", type="pil", format="png", height=display, width=display,
                                 interactive=False, elem_id="onestep-image", elem_classes=["fd-onestep-image"])
                timing = gr.Markdown(elem_id="onestep-time")
            with gr.Column(scale=1, visible=model.teacher is not None):
                teacher_image = gr.Image(label=f"Teacher, {model.teacher_sampler} {model.teacher_steps} steps",
                                         type="pil", format="png", height=display, width=display, interactive=False,
                                         elem_id="teacher-image", elem_classes=["fd-onestep-image"])
                teacher_timing = gr.Markdown(elem_id="teacher-time")

        inputs = [x for x in (condition_input, seed, guidance_input) if x is not None]

        def split(values):
            values = list(values)
            condition = values.pop(0) if condition_input is not None else None
            s = int(values.pop(0) or 0)
            g = values.pop(0) if guidance_input is not None else None
            return condition, s, g

        def generate(*values):
            condition, s, g = split(values)
            img, ms = model.generate(condition, s, g)
            return img, _ms(ms, f"one step, {model.device.type}")

        def generate_teacher(*values):
            condition, s, g = split(values)
            img, ms = model.generate_teacher(condition, s, g)
            return img, _ms(ms, f"{model.teacher_steps} steps, {model.device.type}")

        def on_change(*values):  # live mode: an input changed
            *values, is_live = values
            return generate(*values) if is_live else (gr.skip(), gr.skip())

        def teacher_if(*values):  # the teacher follows when shown (and, for changes, in live mode)
            *values, shown, is_live = values
            if model.teacher is None or not shown or not is_live:
                return gr.skip(), gr.skip()
            return generate_teacher(*values)

        # Every user's requests go through one queue per model, one generation at a time: the student and the
        # teacher are separate pipelines, so the teacher's many steps never hold up the one-step image.
        student = dict(concurrency_id="onestep", concurrency_limit=1)
        teacher = dict(concurrency_id="teacher", concurrency_limit=1, api_visibility="private")
        live_inputs, teacher_inputs = [*inputs, live_box], [*inputs, show_teacher, live_box]
        always = gr.State(True)
        button.click(generate, inputs, [image, timing], api_name="generate", **student)
        demo.load(generate, inputs, [image, timing], api_visibility="private", **student)
        for component in inputs:
            component.change(on_change, live_inputs, [image, timing], api_visibility="private",
                             trigger_mode="always_last", show_progress="minimal", **student)
        if model.teacher is not None:
            for component in inputs:
                component.change(teacher_if, teacher_inputs, [teacher_image, teacher_timing],
                                 trigger_mode="always_last", show_progress="minimal", **teacher)
            for event in (button.click, demo.load, show_teacher.change):
                event(teacher_if, [*inputs, show_teacher, always], [teacher_image, teacher_timing], **teacher)
            # the API's endpoint for the teacher (a button that is never shown)
            gr.Button(visible=False).click(generate_teacher, inputs, [teacher_image, teacher_timing],
                                           api_name="generate_teacher", concurrency_id="teacher",
                                           concurrency_limit=1)
    return demo


def launch_demo(demo, *, host: str = DEFAULT_HOST, port: Optional[int] = DEFAULT_PORT, block: bool = True,
                max_queue: int = 64):
    """Queue (``max_queue`` waiting requests at most) and serve ``demo`` on ``host:port``; no share link, no
    telemetry. ``block=False`` returns at once (the server runs in a thread; ``demo.close()`` stops it)."""
    gr = _import_gradio()

    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                       show_error=True, css=_CSS, theme=gr.themes.Default(), quiet=True)


# ------------------------------------------------------------------------------------------------ the command
def add_demo_parser(sub) -> None:
    """The ``demo`` subcommand of ``fd-onestep`` (arguments only; no Gradio import)."""
    import argparse

    demo = sub.add_parser(
        "demo", help="Try a one-step generator in the browser (Gradio): prompt or class, seed, live mode, timings.",
        description="Serve a Gradio page for a one-step generator: a prompt box (or a class picker), seed, guidance, "
        "a live mode that regenerates as you type, the one-step image with its milliseconds and, with --with_teacher, "
        f"the teacher's multi-step image with its time. Needs the demo extra: {_INSTALL_HINT}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("run", help="A training run's output dir (a pipeline, or a LoRA with fd_onestep_lora.json), a "
                      "folder saved by FDOneStepPipeline, or a Hub id of either.")
    demo.add_argument("--host", default=DEFAULT_HOST, help="Address to listen on (0.0.0.0 to serve other machines).")
    demo.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port to listen on.")
    demo.add_argument("--device", default=None, help="Device of the model (default: cuda if available, else cpu).")
    demo.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="Weights dtype (default fp32).")
    demo.add_argument("--with_teacher", action="store_true",
                      help="Also show the teacher's multi-step image (the teacher the run recorded).")
    demo.add_argument("--teacher", default=None, help="The teacher pipeline to show (implies --with_teacher).")
    demo.add_argument("--teacher_steps", type=int, default=20, help="Sampling steps of the teacher.")
    demo.add_argument("--teacher_sampler", default="dpmsolver++", choices=TEACHER_SAMPLERS,
                      help="The teacher's sampler for DDPM-style teachers ('own': its scheduler as saved).")
    demo.add_argument("--no_live", action="store_true", help="Start with the live mode off.")
    demo.add_argument("--title", default=None, help="Title of the page.")
    demo.add_argument("--cache_dir", default=None, help="Hugging Face cache directory.")
    demo.add_argument("--local_files_only", action="store_true", help="Never download; use local folders and caches.")


def run_demo_command(args, *, block: bool = True):
    """``fd-onestep demo``: checks, one model load, then serve until interrupted (``block=False``: return the
    running page; ``.close()`` stops it)."""
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}.")
    _import_gradio()  # a missing extra is named before any model loads
    dtype = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = load_demo_model(args.run, device=args.device, dtype=dtype, with_teacher=args.with_teacher,
                            teacher=args.teacher, teacher_steps=args.teacher_steps,
                            teacher_sampler=args.teacher_sampler, cache_dir=args.cache_dir,
                            local_files_only=True if args.local_files_only else None)
    demo = build_demo(model, title=args.title, live=not args.no_live)
    print(f"fd-onestep demo: {model.describe()} on http://{args.host}:{args.port}", flush=True)
    launch_demo(demo, host=args.host, port=args.port, block=block)
    return 0 if block else demo


# ------------------------------------------------------------------------------------------------ the Space
SPACE_APP = '''\
"""Gradio demo of the one-step generator {repo_id} (fd-onestep, FD-loss). Written by train_fd_onestep.py --hub_space.

Runs as a Hugging Face Space, and locally with `python app.py` (next to the training run it was written into).
"""

from pathlib import Path

from fd_onestep.demo import build_demo, launch_demo, load_demo_model, space_run

# The run: the training run this folder sits in when there is one, else the model repo on the Hub
# (the environment variable FD_ONESTEP_RUN overrides both).
RUN = space_run(Path(__file__).resolve().parent, hub_id={repo_id!r})
model = load_demo_model(RUN, with_teacher={with_teacher!r})
demo = build_demo(model, title={title!r})

if __name__ == "__main__":
    launch_demo(demo, host=None, port=None)  # GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else 127.0.0.1:7860
'''

SPACE_README = """\
---
title: {title_yaml}
emoji: ⚡
colorFrom: indigo
colorTo: gray
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
models:
- {repo_id}
tags:
- fd-onestep
- one-step
---

# {title}

A one-step generator trained with FD-loss ([fd-onestep](https://pypi.org/project/fd-onestep/)): the model
[{repo_id}](https://huggingface.co/{repo_id}), one denoiser forward per image. Type a prompt (or pick a class);
in live mode the image follows every keystroke, with the milliseconds its generation took.

Run it locally: `pip install -r requirements.txt && python app.py`.
"""


def space_run(space_dir: str | os.PathLike, hub_id: Optional[str]) -> str:
    """The run a Space's ``app.py`` shows: ``$FD_ONESTEP_RUN``, else the training run the Space folder was written
    into (its parent holds a pipeline or a LoRA), else the model repo ``hub_id``."""
    from .evaluation import LORA_INFO_FILE

    if os.environ.get("FD_ONESTEP_RUN"):
        return os.environ["FD_ONESTEP_RUN"]
    parent = Path(space_dir).resolve().parent
    if (parent / "model_index.json").is_file() or (parent / LORA_INFO_FILE).is_file():
        return str(parent)
    if not hub_id:
        raise ValueError(f"no run next to {space_dir} and no Hub id: set FD_ONESTEP_RUN to the run to show.")
    return hub_id


def _package_version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_space(
    output_dir: str | os.PathLike,
    repo_id: Optional[str],
    *,
    title: Optional[str] = None,
    with_teacher: bool = False,
) -> Path:
    """Write the demo as a Gradio Space folder ``<output_dir>/space``: ``app.py`` (this module's page for the run,
    or for ``repo_id`` on the Hub), ``requirements.txt`` (``fd-onestep[demo]`` at the installed version) and
    ``README.md`` with the Space's front matter. Returns the folder."""
    folder = Path(output_dir) / DEMO_SPACE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    repo_id = repo_id or Path(output_dir).resolve().name
    title = title or f"{repo_id.split('/')[-1]}: one step"
    (folder / "app.py").write_text(SPACE_APP.format(repo_id=repo_id, title=title, with_teacher=with_teacher))
    version = _package_version("fd-onestep")
    gradio_version = _package_version("gradio") or "6.0.0"
    (folder / "requirements.txt").write_text(f"fd-onestep[demo]{'==' + version if version else ''}\n")
    (folder / "README.md").write_text(SPACE_README.format(title=title, title_yaml=json.dumps(title), repo_id=repo_id,
                                                         gradio_version=gradio_version))
    return folder


@dataclass
class DemoSpace:
    """A run's demo Space: the local folder, the model repo it shows, the Space repo and, when pushed, its URL."""

    folder: Path
    model_id: str
    space_id: str
    push: bool

    @property
    def url(self) -> Optional[str]:
        return f"https://huggingface.co/spaces/{self.space_id}" if self.push else None

    def card_entry(self) -> dict:
        """What the model card says about it (``render_model_card(demo_space=...)``)."""
        return {"folder": self.folder.name, "url": self.url, "model_id": self.model_id}


def _full_repo_id(repo_id: str, token: Optional[str]) -> str:
    """``name`` -> ``user/name`` (the token's user, as ``create_repo`` resolves it); unchanged when that fails."""
    if "/" in repo_id or not token:
        return repo_id
    try:
        from huggingface_hub import HfApi

        return f"{HfApi(token=token).whoami()['name']}/{repo_id}"
    except Exception:  # noqa: BLE001 - offline: the short id; the upload says what happened
        return repo_id


def prepare_space(output_dir: str | os.PathLike, repo_id: Optional[str], token: Optional[str] = None, *,
                  push: bool = False, with_teacher: bool = False) -> DemoSpace:
    """``--hub_space``: write the Space folder (:func:`write_space`) for the model repo ``repo_id`` (default the
    output dir's name); with ``push`` the Space to upload is ``<repo_id>-demo``, else the folder stays local and
    a log line says so."""
    model_id = _full_repo_id(repo_id or Path(output_dir).resolve().name, token if push else None)
    folder = write_space(output_dir, model_id, with_teacher=with_teacher)
    space = DemoSpace(folder=folder, model_id=model_id, space_id=f"{model_id}-demo", push=push)
    if not push:
        logger.warning(f"The demo Space is written locally at {folder} (not uploaded: no --push_to_hub); run it with "
                       f"`python {folder / 'app.py'}`, or upload it with `hf upload {space.space_id} {folder} . "
                       "--repo-type space`.")
    return space


def publish_space(space: DemoSpace, token: Optional[str], *, private: Optional[bool] = None) -> Optional[str]:
    """Upload the Space folder of :func:`prepare_space` as the Gradio Space ``space.space_id``; return its URL.

    Not pushed (``push`` False), or without the network (``HF_HUB_OFFLINE``, the Hub unreachable): nothing is
    uploaded, a warning says where the folder is and the command that uploads it later, and None is returned.
    """
    from huggingface_hub import HfApi, constants

    if not space.push:
        return None
    later = f"upload it later with `hf upload {space.space_id} {space.folder} . --repo-type space`"
    if constants.HF_HUB_OFFLINE:
        logger.warning(f"The demo Space is written locally at {space.folder} (the Hub is offline: HF_HUB_OFFLINE); "
                       f"{later}.")
        return None
    try:
        api = HfApi(token=token)
        api.create_repo(space.space_id, repo_type="space", space_sdk="gradio", exist_ok=True, private=private)
        api.upload_folder(repo_id=space.space_id, folder_path=str(space.folder), repo_type="space",
                          commit_message="fd-onestep demo Space")
    except Exception as err:  # noqa: BLE001 - the run's outputs are saved; the Space can follow later
        logger.warning(f"The demo Space is written locally at {space.folder} but was not uploaded "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); {later}.")
        return None
    logger.info(f"Pushed the demo Space to {space.url}")
    return space.url
