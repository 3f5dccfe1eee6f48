"""Time the explorer's requests: ``python scripts/benchmark_explorer.py [--run RUN] [--requests 50]``.

Server time per request (routing, JSON in and out, the computation) for one drawing, measured
through Starlette's in-process test client with different test digits, for the page's method sets:
prediction + LRP + saliency + Grad-CAM, every method but occlusion (the page's default), occlusion.
Writes ``STEM.json`` and ``STEM.md`` (``--out``, default ``runs/benchmark_explorer``).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_jax import cli, cpu_kernels  # noqa: E402

SETS = {
    "prediction + LRP + saliency + Grad-CAM": ["lrp", "saliency", "grad_cam"],
    "all methods but occlusion": None,  # the page's default
    "occlusion alone": ["occlusion"],
}


def main(argv=None) -> int:
    cpu_kernels.configure_xla()  # before JAX starts: XLA's faster wide convolutions on a CPU
    p = cli.parser(__doc__)
    p.add_argument("--run", type=Path, default=None, help="run folder (default: newest in runs/)")
    p.add_argument("--requests", type=cli.positive_int, default=50, help="requests per method set")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_explorer"), help="output stem")
    cli.add_data_arguments(p)
    args = p.parse_args(argv)
    from starlette.testclient import TestClient

    from lenet_jax.io import writable_folder, write_report
    from lenet_jax.serve.app import create_app
    from lenet_jax.serve.explorer import Explorer

    run = cli.resolve_run(p, args.run)
    with cli.one_line_errors(p):
        writable_folder(args.out.parent, "--out")
        t0 = time.perf_counter()
        explorer = Explorer(run, data_dir=args.data_dir, data_source=args.data_source)
        startup = time.perf_counter() - t0
    client = TestClient(create_app(explorer), base_url="http://127.0.0.1")  # a host it answers
    rows = []
    for label, methods in SETS.items():
        times, inner = [], []
        for i in range(args.requests + 1):
            image = (explorer.test_images[i] / 255.0).tolist()
            t0 = time.perf_counter()
            response = client.post("/api/explain", json={"image": image, "methods": methods})
            if response.status_code != 200:
                p.error(f"the explorer answered {response.status_code}: {response.text[:200]}")
            answer = response.json()
            if i:  # the first request of a set warms the caches of the JSON path
                times.append(1000 * (time.perf_counter() - t0))
                inner.append(answer["ms"])
        rows.append(
            {
                "methods": label,
                "median_ms": statistics.median(times),
                "p90_ms": sorted(times)[int(0.9 * len(times))],
                "compute_median_ms": statistics.median(inner),
            }
        )
    results = {"machine": cli.machine(), "run": str(run), "startup_s": startup, "rows": rows}
    lines = [
        f"Explorer, server time per request ({args.requests} requests each) on {results['machine']}; "
        f"start-up (load + compile) {startup:.1f} s.",
        "",
        "| methods | median ms | 90th percentile ms | of which computing (median ms) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['methods']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} "
            f"| {r['compute_median_ms']:.1f} |"
        )
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    write_report(args.out, results, markdown)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
