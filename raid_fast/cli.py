"""Command-line interface: ``raid-fast <subcommand>``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence


def environment() -> dict:
    """Versions, devices, the extension's build configuration and the backend table."""
    import torch

    import raid_fast
    from raid_fast import _ext

    info = {
        "raid_fast": raid_fast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "extension": _ext.build_info(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable ({exc})"
    info["backends"] = raid_fast.backends()
    return info


def _cmd_env(args: argparse.Namespace) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    table = info.pop("backends")
    for key, value in info.items():
        print(f"{key:>15}: {value}")
    print("\nbackends (op: backend -> ok | why not)")
    for op, row in table.items():
        for backend, status in row.items():
            print(f"  {op:<18} {backend:<7} {status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raid-fast", description="raid_fast: fast retrieval-augmented anomaly detection"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="versions, build flags and which backend serves each op")
    env.add_argument("--json", action="store_true", help="print as JSON")
    env.set_defaults(func=_cmd_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
