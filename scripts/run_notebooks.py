"""Run the notebooks top to bottom and store them with their outputs: ``python scripts/run_notebooks.py``.

Full size (not the small settings the tests use); a notebook that trains uses the newest run in
``runs/`` when there is one. Each notebook is rewritten atomically, only if every cell ran. Needs
the test extra (nbclient, nbformat, ipykernel).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lenet_jax import cli  # noqa: E402
from lenet_jax.io import atomic_write_bytes  # noqa: E402


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument(
        "names", nargs="*", help="notebook names or stems (default: every notebook in notebooks/)"
    )
    p.add_argument("--timeout", type=cli.positive_int, default=1800, help="seconds per cell")
    args = p.parse_args(argv)
    import nbclient
    import nbformat

    folder = ROOT / "notebooks"
    paths = sorted(folder.glob("*.ipynb"))
    if args.names:
        wanted = {Path(n).stem for n in args.names}
        unknown = wanted - {q.stem for q in paths}
        if unknown:
            p.error(f"no notebook {sorted(unknown)[0]!r}; choose from {[q.stem for q in paths]}")
        paths = [q for q in paths if q.stem in wanted]
    for path in paths:
        started = time.perf_counter()
        book = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(
            book,
            timeout=args.timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(folder)}},
        )
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as e:
            print(
                f"{path.name}: a cell failed; the stored notebook is unchanged\n{e}",
                file=sys.stderr,
            )
            return 1
        atomic_write_bytes(path, nbformat.writes(book).encode())
        print(f"{path.name}: {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
