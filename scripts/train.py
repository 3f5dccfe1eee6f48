"""Train a model: ``python scripts/train.py [--model lenet5] [--dataset mnist] [--preset fast]``.

Every hyperparameter defaults to the model's recipe (``lenet_jax.recipes``), with ``--preset`` on top;
the flags override single values. The logic lives in ``lenet_jax.experiment`` and ``lenet_jax.train``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_jax import cli, cpu_kernels  # noqa: E402
from lenet_jax.data import DATASETS  # noqa: E402
from lenet_jax.models import MODELS  # noqa: E402
from lenet_jax.recipes import PRESETS, default_dataset, recipe  # noqa: E402
from lenet_jax.train import TrainConfig  # noqa: E402

# TrainConfig fields without a flag
NOT_FLAGS = ("eval_batch_size",)


def add_setting_flags(p) -> list[str]:
    """One flag per ``TrainConfig`` setting, from the field's help, choices and check; returns the
    field names. The default is the model's recipe."""
    lenet5 = recipe("lenet5")
    names = []
    for field in dataclasses.fields(TrainConfig):
        if field.name in NOT_FLAGS:
            continue
        meta = field.metadata
        help = (
            f"{meta['help']} (default: the model's recipe; lenet5's: {getattr(lenet5, field.name)})"
        )
        kwargs = {"choices": meta["choices"]} if meta["choices"] else {"type": _flag_type(field)}
        p.add_argument("--" + field.name.replace("_", "-"), default=None, help=help, **kwargs)
        names.append(field.name)
    return names


def _flag_type(field):
    kind = type(field.default)
    check = field.metadata["check"]
    return cli.checked(kind, check, field.metadata["what"]) if check else kind


def main(argv=None) -> int:
    cpu_kernels.configure_xla()  # before JAX starts: XLA's faster wide convolutions on a CPU
    p = cli.parser(__doc__)
    p.add_argument(
        "--model",
        default=None,
        choices=sorted(MODELS),
        help="architecture (default lenet5; with --resume, the run's)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=sorted(DATASETS),
        help="default: the model's own (cifar10 for minivgg, mnist for the others)",
    )
    p.add_argument("--activation", default=None, choices=["tanh", "relu"], help="lenet5 only")
    p.add_argument("--pool", default=None, choices=["avg", "max"], help="lenet5 only")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a named recipe")
    settings = add_setting_flags(p)
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<time>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (default: the newest in runs/) from its last "
        "checkpoint, with its saved settings",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="a new run in --out even if it holds files of another: they are moved aside first "
        "(into OUT.replaced/<time>/)",
    )
    cli.add_data_arguments(p)
    p.add_argument(
        "--train-limit",
        type=cli.positive_int,
        default=None,
        help="train on the first N training images (quick runs)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() first; on SLURM, Open MPI and TPU "
        "pods it finds the cluster itself, elsewhere give the three options below",
    )
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
    p.add_argument("--num-processes", type=cli.positive_int, default=None, help="(multi-host)")
    p.add_argument("--process-id", type=int, default=None, help="0..num-processes-1")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    if args.distributed:
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs use NCCL
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    from lenet_jax.experiment import latest_run, new_run_dir, train_and_evaluate
    from lenet_jax.models import build_model

    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out; --overwrite moves it aside: choose one")
    run_dir = args.out
    if run_dir is None and args.resume:
        run_dir = latest_run()
        if run_dir is None:
            p.error("--resume: no run with a checkpoint in runs/; name one with --out")
    with cli.one_line_errors(p):
        name = args.model or "lenet5"
        overrides = {k: getattr(args, k) for k in settings if getattr(args, k) is not None}
        config = dataclasses.replace(recipe(name, args.preset), **overrides)
        model_args = {"name": name}
        for option in ("activation", "pool"):
            if getattr(args, option) is not None:
                if not name.startswith("lenet5"):
                    raise ValueError(f"--{option} applies to lenet5 and lenet5_relu only")
                model_args[option] = getattr(args, option)
        given = len(model_args) > 1 or args.model is not None
        # --resume without model flags continues whatever model the run holds
        model = build_model(model_args) if given or not args.resume else None
        # the dataset belongs to the run: --dataset, else the model's usual one (a run's own when
        # resuming)
        dataset = args.dataset or (None if args.resume else default_dataset(name))
        run_dir = run_dir or new_run_dir()  # after every check: no empty folder left behind
        train_and_evaluate(
            model,
            config,
            run_dir,
            dataset=dataset,
            resume=args.resume,
            overwrite=args.overwrite,
            data_dir=args.data_dir,
            data_source=args.data_source,
            train_limit=args.train_limit,
            figures=not args.no_figures,
            progress=not args.no_progress,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
