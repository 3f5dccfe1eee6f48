"""Evaluate explanations of a trained run: ``python scripts/evaluate.py [--run RUN] [--n 1000]``.

Scores every method and LRP composite (pixel flipping MoRF/LeRF, faithfulness correlation,
randomization sanity check, conservation, sparseness, runtime) and writes a Markdown and CSV table
and two figures. Logic: ``lenet_jax.evaluation_report.evaluate_run`` and ``lenet_jax.evaluate``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_jax import cli, cpu_kernels  # noqa: E402


def _names(text: str) -> list[str] | None:
    return None if text == "all" else [t for t in text.split(",") if t]


def main(argv=None) -> int:
    cpu_kernels.configure_xla()  # before JAX starts: XLA's faster wide convolutions on a CPU
    p = cli.parser(__doc__)
    cli.add_run_arguments(p)
    p.add_argument("--methods", default="all", help="comma-separated method names, or all")
    p.add_argument("--composites", default="all", help="comma-separated LRP composites, or all")
    p.add_argument("--n", type=cli.positive_int, default=1000, help="test images to evaluate")
    p.add_argument(
        "--n-randomization",
        type=cli.positive_int,
        default=100,
        help="images for the randomization cascade (it re-explains once per layer with parameters)",
    )
    p.add_argument("--patch", type=cli.positive_int, default=2, help="pixel-flipping patch side")
    p.add_argument("--steps", type=cli.positive_int, default=32, help="pixel-flipping steps")
    p.add_argument("--out", type=Path, default=None, help="folder (default RUN/evaluation)")
    cli.add_data_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from lenet_jax.evaluation_report import evaluate_run, evaluation_markdown

    run = cli.resolve_run(p, args.run, args.epoch)
    with cli.one_line_errors(p):
        results = evaluate_run(
            run,
            epoch=args.epoch,
            methods=_names(args.methods),
            composites=_names(args.composites),
            n=args.n,
            n_randomization=min(args.n_randomization, args.n),
            patch=args.patch,
            n_steps=args.steps,
            out=args.out,
            data_dir=args.data_dir,
            data_source=args.data_source,
            progress=not args.no_progress,
        )
    print(evaluation_markdown(results))
    print(f"wrote {args.out or run / 'evaluation'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
