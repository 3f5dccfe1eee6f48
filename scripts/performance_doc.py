"""docs/performance.md and the README's speed table, rendered from the benchmark's JSON.

``scripts/benchmark.py --out docs/performance`` writes ``docs/performance.json`` and, through
``render``, ``docs/performance.md``; ``readme_table`` is the README's short table of ratios. Both are
functions of the JSON alone (the tests check that the committed files are what they render), so the
figures in the docs are the ones the benchmark last measured, once. After editing the page's text
here, ``python scripts/performance_doc.py docs/performance.json`` renders it again (no timing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# ratio key in the JSON -> its line in the README's table (PyTorch tool time / JAX time)
README_RATIOS = {
    "zennit time / JAX LRP time": "LRP `epsilon_plus_flat`, LeNet-5: zennit",
    "zennit time / JAX LRP time, Linen VGG with BatchNorm": (
        "LRP, a Linen VGG with BatchNorm: zennit with its BatchNorm canonizer"
    ),
    "zennit time / JAX LRP time, ResNet-18": "LRP, ResNet-18 (Linen) at 64×64: zennit with its ResNet canonizer",
    "captum saliency time / JAX time": "saliency: captum",
    "captum gradient_x_input time / JAX time": "gradient × input: captum",
    "captum smoothgrad time / JAX time": "SmoothGrad, 50 samples: captum's `NoiseTunnel`",
    "captum integrated_gradients time / JAX time": "Integrated Gradients, 50 steps: captum",
    "captum occlusion time / JAX time": "occlusion, 4×4 window, stride 2: captum",
    "pytorch-grad-cam ScoreCAM time / JAX time": "Score-CAM: pytorch-grad-cam",
    "PyTorch peer epoch / JAX epoch": (
        "training epoch, batch 64: the same LeNet-5 in PyTorch (preloaded tensors)"
    ),
    "LXT AttnLRP time / JAX AttnLRP time, ViT": "AttnLRP, the ViT: LXT 2.1 on its twin",
}

NOTES = """\
## How to read it

- **Ratios.** "tool time / JAX time" above 1 means JAX is faster; "first call" is tracing, planning
  and compiling plus one run (`explain.prepare` compiles once per input shape; later calls, with
  any variables, reuse the program). Every peer runs on a PyTorch twin with the same weights and
  the same images; the maps are compared in the test suite (float64), the table above gives the
  float32 difference where it is measured here.
- **The convolution.** Every method evaluates the model as written, with each convolution in the
  form `lenet_jax/cpu_kernels.py` chooses by its shape on the CPU: a matmul form for few channels
  (LeNet-5's layers) or a tiny input (ResNet-18's last stage at 2×2, where XLA's own convolution
  is 65× slower than a matmul), XLA's convolution otherwise, with the flag `cpu_kernels.XLA_FLAG`
  set by the scripts (recorded under "XLA flags" above). The table "Single convolutions" is the
  bound this puts on every method: where the chosen form is XLA's own, the PyTorch column is what
  oneDNN does with the same convolution. Training keeps its own forms of LeNet-5's layers.
- **LRP's own cost** is "LRP time / saliency time": one forward pass plus one rule evaluation per
  layer, against one forward and one backward pass.
- **Memory.** Each method splits a batch into equal chunks when its working set would exceed
  `explain.common.MEMORY_BUDGET` (4 GiB); the 10,000 LeNet-5 images run whole.
- **The explorer's requests** are timed by `scripts/benchmark_explorer.py`:
  [explorer/benchmark.md](explorer/benchmark.md).

## History

Before the graph engine (2026-12-02) LRP walked the package's own layer list with the CPU forms of
`cpu_kernels.py`, and explained only the package's models: on the same AMD EPYC VM it ran 6.4× as
fast as zennit on LeNet-5. The first graph engine ran every model's `lax.conv` as written, which
made LRP 1.23× zennit, saliency 0.55× captum and Integrated Gradients 0.59× captum (2026-12-06,
same VM); the CPU forms now apply to any model's convolutions.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _number(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 0.01 else f"{value:.1e}"


def render(results: dict) -> str:
    """docs/performance.md for the benchmark's ``results``."""
    versions = ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items())
    lines = [
        "# Performance",
        "",
        f"Measured by `{results['command']}` on {results['date']}: {results['machine']}; "
        f"JAX {results['jax']} on {results['device']}"
        + (f"; {versions}" if versions else "")
        + "."
        + (f" XLA flags: `{results['xla_flags']}`." if results.get("xla_flags") else ""),
        "Every figure here comes from [performance.json](performance.json), which that command wrote",
        "with this page; run it to measure your own machine (`--help` lists the sections and their",
        f"defaults). Explanations are of the first {results['images']:,} MNIST test images in one",
        "call; times are medians of the runs after the first.",
        "",
        "## Ratios",
        "",
        "| what | value |",
        "|---|---:|",
        *[f"| {_cell(k)} | {_number(v)} |" for k, v in results["ratios"].items()],
        "",
        "## Every timing",
        "",
        "| what | first call (s) | median (s) | images/s |",
        "|---|---:|---:|---:|",
    ]
    for row in (r for r in results["rows"] if "conv" not in r):
        ips = f"{row['images_per_s']:,.0f}" if "images_per_s" in row else ""
        name = row["name"]
        if "history" in row:  # time to accuracy: the first epoch, then the total of all epochs
            name += "; first column: epoch 1, second: all epochs"
        lines.append(f"| {_cell(name)} | {row['first_s']:.2f} | {row['median_s']:.3f} | {ips} |")
    lines += _conv_table([r for r in results["rows"] if "conv" in r])
    return "\n".join(lines) + "\n\n" + NOTES


def _conv_table(rows: list[dict]) -> list[str]:
    """Single convolutions: milliseconds per form, and each JAX form's time / PyTorch's."""
    if not rows:
        return []
    forms = list(dict.fromkeys(r["form"] for r in rows))
    lines = [
        "",
        "## Single convolutions",
        "",
        "Milliseconds (median); in brackets the time / PyTorch's.",
        "",
        "| convolution | " + " | ".join(forms) + " |",
        "|---|" + "---:|" * len(forms),
    ]
    by = {(r["conv"], r["what"], r["form"]): r["median_s"] for r in rows}
    for conv, what in dict.fromkeys((r["conv"], r["what"]) for r in rows):
        torch = by.get((conv, what, "PyTorch"))
        cells = []
        for form in forms:
            t = by.get((conv, what, form))
            if t is None:  # pooling has no chosen form: it is XLA's
                cells.append("")
                continue
            cells.append(f"{1000 * t:.1f}" + (f" ({t / torch:.2f})" if torch else ""))
        lines.append(f"| {_cell(conv)}: {what} | " + " | ".join(cells) + " |")
    return lines


def readme_table(results: dict) -> str:
    """The README's table of speed ratios (the entries of ``README_RATIOS`` the JSON has)."""
    lines = ["| what (same weights, same images) | PyTorch tool time / JAX time |", "|---|---:|"]
    for key, label in README_RATIOS.items():
        if key in results["ratios"]:
            lines.append(f"| {label} | {results['ratios'][key]:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """``performance_doc.py STEM.json``: writes ``STEM.md`` beside it and prints the README table."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].endswith(".json"):
        print("usage: python scripts/performance_doc.py docs/performance.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    results = json.loads(path.read_text())
    path.with_suffix(".md").write_text(render(results))
    print(readme_table(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
