"""Metric tables: aligned text for the terminal, CSV or JSON files (written atomically)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from raid_fast import _fileio


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Metrics as an aligned text table, one row per class, in percent."""
    names = list(next(iter(results.values())).keys())
    width = max(len(c) for c in results) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{n:>9}" for n in names)]
    for cls, row in results.items():
        lines.append(f"{cls:<{width}}" + "".join(f"{100 * row[n]:9.1f}" for n in names))
    return "\n".join(lines)


def format_comparison(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One table of several settings (``{setting: per-class metrics}``): a row per class and setting, in percent."""
    first = next(iter(results.values()))
    names = list(next(iter(first.values())).keys())
    cw = max(len(c) for c in first) + 2
    sw = max(len(s) for s in results) + 2
    lines = [f"{'class':<{cw}}{'setting':<{sw}}" + "".join(f"{n:>9}" for n in names)]
    for cls in first:
        for setting, per_class in results.items():
            row = per_class[cls]
            lines.append(f"{cls:<{cw}}{setting:<{sw}}" + "".join(f"{100 * row[n]:9.1f}" for n in names))
    return "\n".join(lines)


def write_results(results: dict[str, dict[str, float]], path: os.PathLike) -> None:
    """Writes metrics as JSON (``.json``) or CSV (anything else), atomically (a unique temporary
    file, then rename), so that an interrupted run never leaves half a results file."""
    path = _fileio.check_output_file(path, "results path")

    def write(tmp: Path) -> None:
        if path.suffix == ".json":
            tmp.write_text(json.dumps(results, indent=2))
            return
        names = list(next(iter(results.values())).keys())
        with tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["class", *names])
            for cls, row in results.items():
                writer.writerow([cls, *(f"{row[n]:.6f}" for n in names)])

    _fileio.atomic_write(path, write, fsync=False)
