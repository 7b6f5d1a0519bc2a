"""The results: a table in the terminal, a JSON file, and the change against an earlier JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from ldm.utils.errors import UserError
from ldm.utils.files import atomic_write

SCHEMA = 1
ROW_FIELDS = ("group", "name", "precision", "batch_size", "steps", "note", "project", "reference", "ratio")
SIDE_FIELDS = ("label", "seconds", "images_per_s", "flops", "gflops_per_s", "mfu", "params")


def seconds(value: float) -> str:
    return f"{value * 1e3:7.1f} ms" if value < 1 else f"{value:7.3f} s "


def both(row: dict, field: str, form: str) -> str:
    """`project/reference` of one field, or the project's alone when there is no reference."""
    values = [side[field] for side in (row["project"], row["reference"]) if side is not None]
    return "/".join(format(value, form) for value in values)


def table(rows: list[dict], peaks: dict[str, float]) -> str:
    """One line per row under a heading per comparison; ratio = project time / reference time."""
    lines = ["peak matmul: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()),
             f"{'':4}{'precision':<9} {'project':<44} {'reference':<44} {'ratio':>6} {'images/s':>13} "
             f"{'GFLOP/s':>13} {'MFU %':>11}"]
    heading = None
    for row in rows:
        if (row["group"], row["name"], row["batch_size"]) != heading:
            heading = (row["group"], row["name"], row["batch_size"])
            lines.append(f"{row['group']}: {row['name']}, batch {row['batch_size']}, median of {row['steps']}")
        project, reference = row["project"], row["reference"]
        mfu = "/".join(f"{side['mfu'] * 100:.2f}" for side in (project, reference) if side is not None)
        ratio = f"{row['ratio']:6.2f}" if row["ratio"] is not None else f"{'':6}"
        cell = [f"{side['label'][:33]:<33} {seconds(side['seconds'])}" if side else "" for side in (project, reference)]
        lines.append(f"{'':4}{row['precision']:<9} {cell[0]:<44} {cell[1]:<44} {ratio} "
                     f"{both(row, 'images_per_s', '.1f'):>13} {both(row, 'gflops_per_s', '.0f'):>13} {mfu:>11}")
        if row.get("memory"):  # rows that also measure the peak memory of a step (group finetune)
            memory = row["memory"]
            lines.append(f"{'':14}peak memory {memory['project'] / 2**20:.1f} MiB / {memory['reference'] / 2**20:.1f} "
                         f"MiB, ratio {memory['ratio']:.2f}")
    return "\n".join(lines)


def write_json(path: str | Path, meta: dict, peaks: dict[str, float], rows: list[dict], skipped: list[str]) -> None:
    document = {"schema": SCHEMA, "meta": meta, "peak_flops": peaks, "skipped": skipped, "results": rows}
    with atomic_write(path) as handle:
        handle.write(json.dumps(document, indent=1).encode())


def read_json(path: str | Path) -> dict:
    """A file written by write_json; a UserError naming the file when it is not one."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--compare {path}: no such file; give the JSON file of an earlier bench run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--compare {path}: not a JSON file ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise UserError(f"--compare {path}: not a bench result (no 'results' list); "
                        f"give a file written by `python -m ldm.tools.bench --json PATH`")
    return document


def row_key(row: dict) -> tuple:
    reference = row["reference"]["label"] if row.get("reference") else None
    return row["group"], row["name"], row["precision"], row["batch_size"], row["project"]["label"], reference


def change(old: float, new: float) -> str:
    return f"{(new / old - 1) * 100:+6.1f}%"


def compare(old: dict, new: dict) -> str:
    """Per row both documents share: the project's time and the ratio, before and after.

    On another machine, or under another load, the times move; the ratios are what carry over.
    """
    before = {row_key(row): row for row in old["results"]}
    lines = ["peak matmul, old -> new: " + ", ".join(
        f"{p} {old.get('peak_flops', {}).get(p, float('nan')) / 1e9:.0f} -> {v / 1e9:.0f} GFLOP/s"
        for p, v in new.get("peak_flops", {}).items())]
    matched, heading = 0, None
    for row in new["results"]:
        earlier = before.get(row_key(row))
        if earlier is None:
            continue
        matched += 1
        if (row["group"], row["name"], row["batch_size"]) != heading:
            heading = (row["group"], row["name"], row["batch_size"])
            lines.append(f"{row['group']}: {row['name']}, batch {row['batch_size']}")
        time_old, time_new = earlier["project"]["seconds"], row["project"]["seconds"]
        line = (f"{'':4}{row['precision']:<5} {row['project']['label'][:33]:<33} "
                f"{seconds(time_old)} -> {seconds(time_new)} {change(time_old, time_new)}")
        if row["ratio"] is not None and earlier.get("ratio") is not None:
            line += f"   ratio {earlier['ratio']:.2f} -> {row['ratio']:.2f} {change(earlier['ratio'], row['ratio'])}"
        lines.append(line)
    lines.append(f"{matched} rows compared; {len(new['results']) - matched} only in the new result, "
                 f"{len(old['results']) - matched} only in the old one")
    return "\n".join(lines)
