"""Explore a trained run in the browser: ``python scripts/serve.py [--run RUN] [--port 8000]``.

Starts a local web server with one page: draw a digit (or pick a test digit, or upload a picture)
and watch the class probabilities and every explanation change as you draw. Needs the ``serve``
extra (``pip install -e ".[serve]"``). Logic: ``lenet_jax.serve``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lenet_jax import cli, cpu_kernels  # noqa: E402


def main(argv=None) -> int:
    cpu_kernels.configure_xla()  # before JAX starts: XLA's faster wide convolutions on a CPU
    p = cli.parser(__doc__)
    cli.add_run_arguments(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    p.add_argument("--port", type=cli.positive_int, default=8000, help="port to listen on")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        help="another host name browsers may reach the server by (with --host 0.0.0.0: the "
        "machine's name or address); 127.0.0.1, localhost and --host are always allowed",
    )
    cli.add_data_arguments(p)
    args = p.parse_args(argv)
    try:
        import uvicorn

        from lenet_jax.serve.app import HOSTS, create_app, server_config
        from lenet_jax.serve.explorer import Explorer
    except ImportError as e:
        p.exit(1, f"{p.prog}: error: {e.name} is missing; install it: pip install -e '.[serve]'\n")

    run = cli.resolve_run(p, args.run, args.epoch)
    with cli.one_line_errors(p):
        explorer = Explorer(
            run, epoch=args.epoch, data_dir=args.data_dir, data_source=args.data_source
        )
    print(f"Explorer of {run} at http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    hosts = tuple(dict.fromkeys((*HOSTS, args.host, *args.allow_host)))
    app = create_app(explorer, hosts=hosts)
    uvicorn.Server(server_config(app, args.host, args.port)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
