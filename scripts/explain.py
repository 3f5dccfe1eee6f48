"""Explain a trained LeNet-5: ``python scripts/explain.py --method lrp [--run RUN_DIR] [--n 16]``.

Writes a PNG grid (input image, heatmap, labels) and an ``.npz`` with the attributions. ``--method
all`` draws every method side by side. Logic: ``lenet_jax.report``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_jax import cli  # noqa: E402
from lenet_jax.explain import COMPOSITES, METHODS  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="lrp", choices=[*METHODS, "all"])
    p.add_argument(
        "--composite",
        default="epsilon_plus_flat",
        choices=list(COMPOSITES),
        help="LRP composite (rules per layer)",
    )
    p.add_argument("--run", type=Path, default=None, help="run folder (default: newest in runs/)")
    p.add_argument("--n", type=cli.positive_int, default=16, help="number of test images")
    p.add_argument(
        "--layer",
        default=None,
        help="LRP: also draw this layer's feature-map relevance (e.g. conv2); "
        "CAMs: their conv layer",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="PNG path (default RUN/explain_<method>.png); the .npz goes beside it",
    )
    p.add_argument(
        "--option",
        type=cli.key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword option of the method, repeatable: e.g. n_samples=100 noise_level=0.2 "
        "(smoothgrad), n_steps=200 (integrated_gradients), window=8 (occlusion), "
        "align_corners=True (score_cam), epsilon=0.01 (lrp)",
    )
    cli.add_data_arguments(p)
    args = p.parse_args(argv)

    from lenet_jax.report import explain_run

    run = cli.resolve_run(p, args.run)
    with cli.one_line_errors(p):
        written = explain_run(
            run,
            args.method,
            n=args.n,
            out=args.out,
            layer=args.layer,
            composite=args.composite,
            options=dict(args.option),
            data_dir=args.data_dir,
            data_source=args.data_source,
        )
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
