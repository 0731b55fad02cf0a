"""Where the last rank writes what it reports: TensorBoard (``--tensorboard-dir``) and Weights &
Biases (``--wandb-project``, Megatron-LM's flags), the same names and steps in both.

A sink has ``scalar(tag, value, step)``, ``figure(tag, fig, step)``, ``histogram(tag, counts,
step)`` (counts per integer bin, e.g. tokens per expert), ``flush()`` and ``close()``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os

import numpy as np

from megatron_ext.errors import UsageError


class TensorBoardSink:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def figure(self, tag: str, fig, step: int) -> None:
        self.writer.add_figure(tag, fig, step, close=False)

    def histogram(self, tag: str, counts: np.ndarray, step: int) -> None:
        """x: bin index (expert id), height: ``counts[i]``."""
        bins = np.arange(len(counts), dtype=np.float64)
        self.writer.add_histogram_raw(
            tag,
            min=0.0,
            max=float(len(counts) - 1),
            num=float(counts.sum()),
            sum=float((bins * counts).sum()),
            sum_squares=float((bins**2 * counts).sum()),
            bucket_limits=(bins + 0.5).tolist(),
            bucket_counts=np.asarray(counts, dtype=np.float64).tolist(),
            global_step=step,
        )

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run (``wandb.init(project, name, dir, config)``); a step's values go out in
    one ``wandb.log`` at ``flush``. ``WANDB_MODE=offline`` writes the run under the save dir
    only (``wandb sync`` uploads it later)."""

    def __init__(self, args: argparse.Namespace):
        import wandb

        self.wandb = wandb
        os.makedirs(args.wandb_save_dir, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        self.run = wandb.init(
            project=args.wandb_project,
            name=args.wandb_exp_name,
            dir=args.wandb_save_dir,
            config=config,
        )
        self.pending: dict = {}
        self.step: int | None = None

    def _put(self, tag: str, value, step: int) -> None:
        if self.step is not None and step != self.step:
            self.flush()
        self.step = step
        self.pending[tag] = value

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._put(tag, float(value), step)

    def figure(self, tag: str, fig, step: int) -> None:
        from PIL import Image

        from megatron_ext.observe.figures import png_bytes

        self._put(tag, self.wandb.Image(Image.open(io.BytesIO(png_bytes(fig)))), step)

    def histogram(self, tag: str, counts: np.ndarray, step: int) -> None:
        bins = np.arange(len(counts) + 1, dtype=np.float64) - 0.5
        self._put(tag, self.wandb.Histogram(np_histogram=(np.asarray(counts), bins)), step)

    def flush(self) -> None:
        if self.pending:
            self.run.log(self.pending, step=self.step)
            self.pending = {}

    def close(self) -> None:
        self.flush()
        self.run.finish()


def check_wandb_flags(args: argparse.Namespace) -> None:
    """Megatron-LM's rules, said before anything is built: a project needs an experiment name
    and somewhere to write (``--wandb-save-dir``, default ``<--save>/wandb``), and ``wandb``
    must import."""
    if not args.wandb_project:
        return
    if not args.wandb_exp_name:
        raise UsageError("--wandb-project needs --wandb-exp-name (the run's name in W&B)")
    if not args.wandb_save_dir:
        if not args.save:
            raise UsageError(
                "--wandb-project needs --wandb-save-dir, or --save (it defaults to <--save>/wandb)"
            )
        args.wandb_save_dir = os.path.join(args.save, "wandb")
    if importlib.util.find_spec("wandb") is None:
        raise UsageError(
            "--wandb-project: the wandb package is not installed (pip install "
            "'megatron-mixtral[wandb]')"
        )


def open_sinks(args: argparse.Namespace) -> list:
    """The sinks of the rank that reports (the caller picks the last rank)."""
    sinks = []
    if args.tensorboard_dir:
        sinks.append(TensorBoardSink(args.tensorboard_dir))
    if args.wandb_project:
        sinks.append(WandbSink(args))
    return sinks
