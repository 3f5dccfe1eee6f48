"""Explain a trained LeNet-5: ``python scripts/explain.py --method lrp [--run RUN_DIR] [--n 16]``.

Writes a PNG grid (input image, heatmap, labels) and an ``.npz`` with the attributions. ``--method
all`` draws every method side by side; ``--indices`` picks test images, ``--image`` explains your
own picture files, ``--target`` a class other than the predicted one. Logic: ``lenet_jax.report``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_jax import cli, cpu_kernels  # noqa: E402
from lenet_jax.explain import COMPOSITES, METHODS  # noqa: E402


def main(argv=None) -> int:
    cpu_kernels.configure_xla()  # before JAX starts: XLA's faster wide convolutions on a CPU
    p = cli.parser(__doc__)
    p.add_argument("--method", default="lrp", choices=[*METHODS, "all"])
    p.add_argument(
        "--composite",
        default=None,
        choices=list(COMPOSITES),
        help="LRP composite (rules per layer) (default: the model's: attn_lrp for a ViT, "
        "epsilon_plus_flat for the CNNs)",
    )
    cli.add_run_arguments(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--n",
        type=cli.positive_int,
        default=16,
        help="number of test images, at most 64 (the first ones; for all, a quarter misclassified)",
    )
    which.add_argument(
        "--indices", type=cli.index_list, default=None, help="these test images, e.g. 0,7,42"
    )
    which.add_argument(
        "--image",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="explain your own image files (PNG, JPEG): dark ink on a light background is "
        "inverted, and digits are laid out as MNIST's (20x20 box, centered by mass)",
    )
    p.add_argument(
        "--target",
        type=cli.non_negative_int,
        default=None,
        help="the class to explain in every image (default: the predicted class)",
    )
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
        help="PNG path (default: in RUN, named after the method, options and inputs, e.g. "
        "explain_lrp_epsilon_plus_flat_first16.png); the .npz goes beside it",
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

    run = cli.resolve_run(p, args.run, args.epoch)
    with cli.one_line_errors(p):
        written = explain_run(
            run,
            args.method,
            epoch=args.epoch,
            n=args.n,
            indices=args.indices,
            images=args.image,
            target=args.target,
            out=args.out,
            layer=args.layer,
            composite=args.composite,
            options=dict(args.option),
            data_dir=args.data_dir,
            data_source=args.data_source,
        )
    for path in written.values():
        print(f"wrote {path}")
    if args.image:
        saved = np.load(written["npz"])
        probs = softmax(saved["logits"])
        for name, p in zip(saved["files"], probs, strict=True):
            print(f"{name}: predicted {saved['classes'][p.argmax()]} (probability {p.max():.3f})")
    return 0


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


if __name__ == "__main__":
    sys.exit(main())
