"""Command-line interface: ``raid-fast <subcommand>``.

A failure prints one line to stderr (``raid-fast <command>: error: <what, which file or argument,
what to do>``) and exits with 2 for a usage error (a bad argument, input file or output path) or 1
for anything else; ``--debug`` shows the traceback instead. Output paths are checked before any
compute.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import traceback
import warnings
from collections.abc import Sequence

# errors that mean "the invocation is wrong": bad arguments, input files or output paths
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


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
    from raid_fast import kernels

    info["triton"] = kernels.TRITON_VERSION or f"not importable ({kernels.TRITON_IMPORT_ERROR})"
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
    width = max((len(op) for op in table), default=0)
    for op, row in table.items():
        for backend, status in row.items():
            print(f"  {op:<{width}} {backend:<7} {status}")
    return 0


def _cmd_build_db(args: argparse.Namespace) -> int:
    from raid_fast import _fileio
    from raid_fast.app.pipelines import build_database

    _fileio.check_output_file(args.out, "--out")
    db = build_database(
        args.data,
        args.out,
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        shots=args.shots,
        n_semantic=args.n_semantic,
        label_free=args.label_free,
        kmeans_iters=args.kmeans_iters,
        kmeans_precision=args.kmeans_precision,
        seed=args.seed,
        device=args.device,
        stride=args.stride,
        layers=args.layers,
        aggregate=args.aggregate,
        image_score=args.image_score,
    )
    print(f"{db} -> {args.out}")
    if db.class_purity is not None:
        print(f"label-free class prototypes: purity {db.class_purity:.4f}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from raid_fast import _fileio
    from raid_fast.app.pipelines import detector_from_database, evaluate_dataset
    from raid_fast.app.reports import format_table, write_results

    if args.out:
        _fileio.check_output_file(args.out, "--out")
    det, db = detector_from_database(
        args.db, args.device, args.filter, k=args.k, nprobe=args.nprobe, mode=args.mode, image_score=args.image_score
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        results = evaluate_dataset(
            det,
            args.data,
            db.params["image_size"],
            batch_size=args.batch_size,
            route_unknown=args.route_unknown_classes,
        )
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(format_table(results))
    if args.out:
        write_results(results, args.out)
        print(f"wrote {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from raid_fast import _fileio
    from raid_fast.app.pipelines import foreground_modes, train_filter
    from raid_fast.database import TokenDatabase
    from raid_fast.detect.training import TrainConfig

    _fileio.check_output_folder(args.out, "--out")
    foreground = None
    if args.foreground:
        foreground = foreground_modes(TokenDatabase.load(args.db), args.foreground)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        k=args.k,
        nprobe=args.nprobe,
        mode=args.mode,
        seed=args.seed,
        val_fraction=args.val_fraction,
        dense_router_epoch=args.dense_router_epoch,
        amp=not args.no_amp,
        out_dir=args.out,
        texture_dir=args.texture_dir,
        foreground=foreground,
    )
    _, history = train_filter(
        args.data, args.db, config, resume=args.resume, progress=True, device=args.device, overwrite=args.overwrite
    )
    for rec in history["epochs"]:
        val = f"  val loss {rec['val_loss']:.4f}  val P-AUROC {rec['val_p_auroc']:.4f}" if "val_loss" in rec else ""
        print(f"epoch {rec['epoch']:3d}  train loss {rec['train_loss']:.4f}{val}")
    best = history["best_epoch"]
    print(f"checkpoints in {args.out}: last.pt" + (f", best.pt (epoch {best})" if best is not None else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from raid_fast.app.demo import run_demo

    run_demo(
        args.out,
        epochs=args.epochs,
        image_size=args.image_size,
        k=args.k,
        nprobe=args.nprobe,
        seed=args.seed,
        device=args.device,
        examples_per_class=args.examples,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raid_fast import _fileio
    from raid_fast.app.pipelines import database_class_names, detector_from_database, predict_files, resolve_class

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        msg = f"image files not found: {missing[:5]}"
        raise FileNotFoundError(msg)
    _fileio.check_output_folder(args.out, "--out")
    det, db = detector_from_database(
        args.db, args.device, args.filter, k=args.k, nprobe=args.nprobe, mode=args.mode, image_score=args.image_score
    )
    class_id = None if args.class_name is None else resolve_class(db, args.class_name)
    names = database_class_names(db)

    def show(paths, scores, class_ids):
        for path, score, c in zip(paths, scores.tolist(), class_ids.tolist()):
            print(f"{score:10.4f}  {names[c] or f'class {c}'}  {path}")

    predict_files(
        det,
        args.images,
        db.params["image_size"],
        args.out,
        batch_size=args.batch_size,
        class_id=class_id,
        on_batch=show,
    )
    print(f"wrote {len(args.images)} overlays to {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import time

    import torch

    from raid_fast import _fileio
    from raid_fast.app.pipelines import detector_from_database
    from raid_fast.detect.export import export_detector

    _fileio.check_output_file(args.out, "--out")
    det, db = detector_from_database(
        args.db, args.device, args.filter, k=args.k, nprobe=args.nprobe, mode=args.mode, image_score=args.image_score
    )
    size = db.params["image_size"]
    example = torch.rand(args.batch_size, 3, size, size, device=args.device)
    start = time.perf_counter()
    path = export_detector(det, example, args.out, package=args.package)
    print(
        f"wrote {path} ({args.package}, {path.stat().st_size / 2**20:.1f} MiB, batch {args.batch_size} x 3 x "
        f"{size} x {size}) in {time.perf_counter() - start:.0f} s; run it with raid_fast.load_exported({str(path)!r})"
    )
    return 0


def _cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from raid_fast.detect.checkpoints import convert_legacy_checkpoint

    ckpt = convert_legacy_checkpoint(args.old, args.new)
    print(f"converted {args.old} (epoch {ckpt['epoch']}) -> {args.new}")
    return 0


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="database file written by build-db")
    p.add_argument(
        "--filter", default=None, help="trained filter checkpoint, e.g. RUN/best.pt (default: retrieval only)"
    )
    p.add_argument("--k", type=int, default=None, help="neighbours per token (default: the filter's, else 150)")
    p.add_argument("--nprobe", type=int, default=None, help="prototypes probed per token (default: as trained, else 5)")
    p.add_argument(
        "--mode", choices=["hierarchical", "flat"], default=None, help="default: as trained, else hierarchical"
    )
    p.add_argument(
        "--image-score", default=None, help="image score: top1%%, max, top<k>, top<p>%% (default: the database's)"
    )
    p.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raid-fast", description="raid_fast: fast retrieval-augmented anomaly detection"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # --debug after the subcommand too; SUPPRESS keeps a main-parser --debug from being reset
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    env = command("env", help="versions, build flags and which backend serves each op")
    env.add_argument("--json", action="store_true", help="print as JSON")
    env.set_defaults(func=_cmd_env)

    bdb = command("build-db", help="build a token database from the train/good images of MVTec-layout folders")
    bdb.add_argument("--data", nargs="+", required=True, help="dataset root(s) in MVTec layout")
    bdb.add_argument("--out", required=True, help="database file to write (.safetensors)")
    bdb.add_argument("--backbone", default="efficientnet_lite0", help="efficientnet_lite0 (offline) or dinov2_vits14")
    bdb.add_argument("--weights", default=None, help="local weight file (dinov2_vits14)")
    bdb.add_argument("--image-size", type=int, default=256)
    bdb.add_argument("--shots", type=int, default=None, help="templates per class (default: all)")
    bdb.add_argument("--n-semantic", type=int, default=50)
    bdb.add_argument("--label-free", action="store_true", help="class prototypes by KMeans over CLS tokens")
    bdb.add_argument("--kmeans-iters", type=int, default=25)
    bdb.add_argument(
        "--kmeans-precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="fp16/bf16: half-precision Lloyd iterations (one pass over the tokens per iteration on a GPU)",
    )
    bdb.add_argument(
        "--stride", type=int, choices=[8, 16], default=None, help="token stride of efficientnet_lite0 (default 8)"
    )
    bdb.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="efficientnet_lite0 stages of the tokens (default: blocks.1 blocks.2 blocks.4)",
    )
    bdb.add_argument("--aggregate", type=int, default=1, help="p x p local average of the features (1: none)")
    bdb.add_argument(
        "--image-score", default="top1%", help="recorded image score: top1%% (default), max, top<k> or top<p>%%"
    )
    bdb.add_argument("--seed", type=int, default=0)
    bdb.add_argument("--device", default="cpu")
    bdb.set_defaults(func=_cmd_build_db)

    ev = command("eval", help="per-class metrics on the test split(s)")
    ev.add_argument("--data", nargs="+", required=True, help="dataset root(s) in MVTec layout")
    ev.add_argument("--out", default=None, help="write metrics to .json or .csv")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument(
        "--route-unknown-classes",
        action="store_true",
        help="evaluate test classes the database has no templates of, routing their images by CLS token "
        "(label-free) to the nearest database class; without it such classes are refused",
    )
    _add_detector_args(ev)
    ev.set_defaults(func=_cmd_eval)

    tr = command("train", help="train the guided MoE filter on synthetic anomalies of the train images")
    tr.add_argument("--data", nargs="+", required=True, help="dataset root(s) in MVTec layout (as for build-db)")
    tr.add_argument("--db", required=True, help="database file written by build-db")
    tr.add_argument("--out", required=True, help="run folder: last.pt every epoch, best.pt on held-out improvement")
    tr.add_argument("--epochs", type=int, default=100)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--lr", type=float, default=1e-4)
    tr.add_argument("--k", type=int, default=150, help="neighbours per token = the filter's cost-volume depth")
    tr.add_argument("--nprobe", type=int, default=5)
    tr.add_argument("--mode", choices=["hierarchical", "flat"], default="hierarchical")
    tr.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the train images per class")
    tr.add_argument("--dense-router-epoch", type=int, default=0, help="epoch from which router 2 weights the experts")
    tr.add_argument("--texture-dir", default=None, help="DTD images/ folder for texture anomalies")
    tr.add_argument(
        "--foreground",
        nargs="*",
        default=None,
        help="'auto' (the authors' per-class Otsu modes) or CLASS=dark|bright ...",
    )
    tr.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (same settings, more epochs)")
    tr.add_argument(
        "--overwrite", action="store_true", help="start a new run in OUT, deleting its last.pt and best.pt (only those)"
    )
    tr.add_argument("--device", default="cpu")
    tr.set_defaults(func=_cmd_train)

    de = command("demo", help="the whole pipeline on the embedded dataset (minutes on a CPU)")
    de.add_argument("--out", default="raid_fast_demo", help="folder for the data, database, checkpoints and PNGs")
    de.add_argument("--epochs", type=int, default=20)
    de.add_argument("--image-size", type=int, default=256)
    de.add_argument("--k", type=int, default=150)
    de.add_argument("--nprobe", type=int, default=5)
    de.add_argument("--examples", type=int, default=3, help="test images per class drawn as PNG panels")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--device", default="cpu")
    de.set_defaults(func=_cmd_demo)

    pr = command("predict", help="anomaly scores and PNG overlays for images")
    pr.add_argument("images", nargs="+", help="image files")
    pr.add_argument("--out", required=True, help="folder for the overlay PNGs")
    pr.add_argument("--batch-size", type=int, default=8, help="images read and scored at a time")
    pr.add_argument(
        "--class",
        dest="class_name",
        metavar="CLASS",
        default=None,
        help="database class of every image (labelled databases); default: route each image by its CLS token",
    )
    _add_detector_args(pr)
    pr.set_defaults(func=_cmd_predict)

    ex = command("export", help="write a detector (database, backbone, filter) as one deployable .pt2 file")
    ex.add_argument("--out", required=True, help="the .pt2 file to write")
    ex.add_argument(
        "--package",
        choices=["aoti", "program"],
        default="aoti",
        help="aoti: AOTInductor package (compiled); program: the torch.export program (no compiler needed)",
    )
    ex.add_argument("--batch-size", type=int, default=1, help="the batch the package takes (fixed)")
    _add_detector_args(ex)
    ex.set_defaults(func=_cmd_export)

    cv = command(
        "convert-checkpoint",
        help="convert an old-format (pickled) filter checkpoint whose origin you trust into the current format",
    )
    cv.add_argument("old", help="old-format checkpoint (read with torch's restricted weights_only unpickler)")
    cv.add_argument("new", help="file to write in the current format")
    cv.set_defaults(func=_cmd_convert_checkpoint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the exit status (0, 1 or 2; see the module docstring)."""
    args = build_parser().parse_args(argv)
    if args.command in ("train", "demo", "build-db", "eval"):
        _log_progress()
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"raid-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        usage = isinstance(exc, USAGE_ERRORS)
        text = " ".join(str(exc).split()) or type(exc).__name__
        hint = "" if usage or debug else " (--debug shows the traceback)"
        print(f"raid-fast {args.command}: error: {text}{hint}", file=sys.stderr)
        return 2 if usage else 1


def _log_progress() -> None:
    """Shows raid_fast's INFO lines (backend choices, one line per training epoch) on stderr; other
    libraries' loggers are left alone. Idempotent: main() may run several times in one process."""
    log = logging.getLogger("raid_fast")
    if not any(getattr(h, "_raid_fast_cli", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._raid_fast_cli = True
        log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
