"""Train LeNet-5 on MNIST: ``python scripts/train.py [--epochs 10] [--out runs/NAME] [--resume]``.

Kept short on purpose: the logic lives in ``lenet_jax.experiment`` and ``lenet_jax.train``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_jax import cli  # noqa: E402
from lenet_jax.models import MODELS  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet5", choices=sorted(MODELS), help="architecture")
    p.add_argument("--activation", default="tanh", choices=["tanh", "relu"])
    p.add_argument("--pool", default="avg", choices=["avg", "max"])
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=cli.positive_float, default=0.01, help="learning rate (peak)")
    p.add_argument("--momentum", type=cli.unit_interval, default=0.9, help="SGD momentum")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine", "onecycle"])
    p.add_argument("--warmup-epochs", type=cli.non_negative_float, default=0.0)
    p.add_argument("--weight-decay", type=cli.non_negative_float, default=0.0)
    p.add_argument("--label-smoothing", type=cli.unit_interval, default=0.0)
    p.add_argument("--batch-size", type=cli.positive_int, default=64)
    p.add_argument("--epochs", type=cli.positive_int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "python", "scan"],
        help="python: dispatch the jitted step (fast on CPU); scan: one jitted epoch "
        "(fast on GPU); auto picks by backend",
    )
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<time>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (default: the newest in runs/) from its last "
        "checkpoint, with its saved settings",
    )
    cli.add_data_arguments(p)
    p.add_argument(
        "--train-limit",
        type=cli.positive_int,
        default=None,
        help="train on the first N training images (quick runs)",
    )
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    from lenet_jax.experiment import latest_run, new_run_dir, train_and_evaluate
    from lenet_jax.models import build_model
    from lenet_jax.train import TrainConfig

    run_dir = args.out
    if run_dir is None:
        run_dir = latest_run() if args.resume else new_run_dir()
        if run_dir is None:
            p.error("--resume: no run with a checkpoint in runs/; name one with --out")
    with cli.one_line_errors(p):
        config = TrainConfig(
            optimizer=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            schedule=args.schedule,
            warmup_epochs=args.warmup_epochs,
            weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing,
            batch_size=args.batch_size,
            epochs=args.epochs,
            seed=args.seed,
            loop=args.loop,
        )
        model = build_model({"name": args.model, "activation": args.activation, "pool": args.pool})
        train_and_evaluate(
            model,
            config,
            run_dir,
            resume=args.resume,
            data_dir=args.data_dir,
            data_source=args.data_source,
            train_limit=args.train_limit,
            figures=not args.no_figures,
            progress=not args.no_progress,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
