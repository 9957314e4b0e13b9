"""Compare several image generators side by side: sample grid, FD in every representation, class coverage.

The question this answers is the one the method makes a claim about: is a one-step student as good as its
teacher's multi-step sampler, and much better than the naive one-step use of the teacher -- measured in
every given representation, including ones that were *held out* of the training loss (a training FD that
falls while a held-out FD rises means the generator is fooling the training encoders).

A generator is any callable ``generate(batch_size: int, generator: torch.Generator) -> Tensor`` returning
float images (batch_size, C, H, W) in [-1, 1]; class-conditional ones (``compare_generators(...,
num_classes=C)``) are called ``generate(batch_size, generator, class_labels)`` with (batch_size,) int64
labels. Every generator gets the same random streams (the grid is drawn from ``seed``, the FD population
from ``seed + 1``) and the same labels, so generators that draw their noise the same way (e.g. a teacher
and its one-step student) show the same noise in the same grid cell.

``compare_generators`` writes to ``output_dir``:

- ``comparison_grid.png``: one labelled block per generator, ``grid_samples`` images each;
- ``comparison.md``: the FD table (one column per representation, held-out ones marked, FD_r = FD /
  validation FD where the reference statistics carry a ``validation_fd``), plus the class histogram
  summary when a classifier is given;
- ``comparison.json``: the same numbers, machine-readable (structure in :func:`compare_generators`);
- class-conditional (``num_classes``): the grid has one row per class, and the table a "Conditioning" part:
  adherence (classifier), per-class FD and the Fréchet Joint Distance (``class_references``);
- ``comparison_samples/<folder>/[<label>/]<index>.png``: the FD samples of the generators named in
  ``sample_folders``.

FD of N samples is itself a random number. ``seed_spread`` repeats the FD measurement over several seeds
and reports each FD's mean and standard deviation, so that "1.38x the teacher" can be read against the noise
of the measurement (``seed_spread.md`` / ``seed_spread.json``).

Modules:

- :mod:`.generators`: generator callables from diffusers pipelines (``teacher_sampler``,
  ``naive_one_step_teacher``, ``one_step_pipeline``);
- :mod:`.measure`: ``compare_generators`` and ``seed_spread``;
- :mod:`.report`: the grid PNG, the markdown tables, the file names;
"""

from .generators import GeneratorFn, naive_one_step_teacher, one_step_pipeline, teacher_sampler
from .measure import compare_generators, seed_spread
from .report import format_markdown_table, format_seed_spread_table, save_comparison_grid

__all__ = [
    "GeneratorFn",
    "compare_generators",
    "teacher_sampler",
    "naive_one_step_teacher",
    "one_step_pipeline",
    "seed_spread",
    "format_markdown_table",
    "format_seed_spread_table",
    "save_comparison_grid",
]
