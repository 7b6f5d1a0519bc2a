"""The table of an evaluation sweep, and its quality-vs-NFE curve.

    python evaluate.py -m run=DIR sampler=euler,heun,dpmpp_2m steps=10,25,50
    python -m ldm.evaluation.table runs/evaluate/multirun/2026-11-23/10-00-00 [--metric fd_digits] [--no-wandb]

Reads every `metrics.json` under the directory (also real-image floors and other evaluations put there),
prints one row per job and writes `quality_vs_nfe.png` beside them. NFE is the number of sequential network
calls per image (`sampler.calls(steps)`: heun makes 2 per step but the last); classifier-free guidance
evaluates a doubled batch in each call and does not change it (`network_batches_per_image` counts both halves).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ldm.evaluation.record import METRICS_FILE, read_metrics

FIRST_COLUMNS = ("label", "nfe", "steps", "guidance")


def collect(directory: str | Path) -> list[dict]:
    """One flat row per metrics.json under `directory`: its label, settings and metrics, sorted by label and NFE."""
    rows = []
    for path in sorted(Path(directory).rglob(METRICS_FILE)):
        record = read_metrics(path)
        settings = record.get("provenance", {})
        rows.append({"label": label(settings), "nfe": settings.get("nfe"), "steps": settings.get("steps"),
                     "guidance": settings.get("guidance"), **record.get("metrics", {}),
                     "group": settings.get("wandb_group"), "path": str(path.parent),
                     "how_guided": guidance_text(settings)})
    # a directory that mixes guidance (e.g. a guidance=0 job beside the sweep, or kinds) gets one curve per setting
    if len({row["how_guided"] for row in rows if row["nfe"] is not None}) > 1:
        for row in rows:
            if row["nfe"] is not None:
                row["label"] = f"{row['label']} guidance {row['how_guided']}"
    for row in rows:
        del row["how_guided"]
    return sorted(rows, key=lambda row: (row["label"], row["nfe"] if row["nfe"] is not None else -1))


def guidance_text(settings: dict) -> str:
    """`2` for classifier-free scale 2 (as before the other kinds), else the kind, scale and interval."""
    scale, kind = settings.get("guidance"), settings.get("guidance_kind", "cfg")
    text = "-" if scale is None else f"{scale:g}"
    if kind != "cfg":
        text = f"{kind} {text}" + (f" (cfg {settings['guidance_cfg_scale']:g})" if "guidance_cfg_scale" in settings
                                   else "")
    if settings.get("guidance_weak"):  # "RUN_DIR:CHECKPOINT:step N"
        run, _, step = settings["guidance_weak"].rsplit(":", 2)
        text += f" (weak {Path(run).name} {step})"
    if settings.get("guidance_interval"):
        low, high = settings["guidance_interval"]
        text += f" {settings.get('guidance_interval_in', 't')} in ({low:g}, {high:g}]"
    return text


def label(settings: dict) -> str:
    """What a row measured: a sampler, real images (the floor), a sample file or untrained weights."""
    if settings.get("real"):
        return f"real {settings['real']}" + (" through the autoencoder" if settings.get("reconstructed") else "")
    if settings.get("samples"):
        return Path(settings["samples"]).name
    name = settings.get("sampler_name") or settings.get("sampler") or "?"
    if settings.get("ema_length") is not None:  # a post-hoc EMA length: a row per length
        name = f"{name} ema_length {settings['ema_length']:g}"
    return f"{name} (untrained)" if settings.get("checkpoint") == "init" else name


def metric_names(rows: list[dict]) -> list[str]:
    skip = {*FIRST_COLUMNS, "group", "path"}
    return list(dict.fromkeys(key for row in rows for key in row if key not in skip and not key.endswith("_std")))


def format_table(rows: list[dict], metrics: list[str] | None = None) -> str:
    """A plain text table, one row per evaluation."""
    columns = [*FIRST_COLUMNS, *(metrics or metric_names(rows))]
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_quality_vs_nfe(rows: list[dict], metric: str, ax=None):
    """`metric` against NFE, a line per sampler; rows without NFE (real images, sample files) as dashed levels."""
    import matplotlib.pyplot as plt  # deferred: heavy, only for plots / wandb

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row.get(metric) is None:
            continue
        if row["nfe"] is None:
            ax.axhline(row[metric], linestyle="--", color="gray", linewidth=1)
            ax.annotate(row["label"], (0, row[metric]), xycoords=("axes fraction", "data"), fontsize=8,
                        color="gray", va="bottom")
        else:
            curves.setdefault(row["label"], []).append((row["nfe"], row[metric]))
    for name, points in sorted(curves.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log")
    values = [row[metric] for row in rows if row.get(metric) is not None]
    if values and min(values) > 0 and max(values) / min(values) > 20:  # e.g. an untrained model beside trained ones
        ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel(metric)
    if curves:
        ax.legend(fontsize=8)
    return ax


def default_metric(rows: list[dict]) -> str:
    names = metric_names(rows)
    return next((name for name in names if name.startswith(("fid", "fd_"))), names[0] if names else "")


def write_plot(rows: list[dict], metric: str, path: str | Path) -> Path:
    import matplotlib  # deferred: heavy, only for plots / wandb

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy, only for plots / wandb

    ax = plot_quality_vs_nfe(rows, metric)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)
    return Path(path)


def log_wandb(rows: list[dict], plot: Path, directory: Path, project: str = "ldm") -> None:
    """The table and the curve as one wandb run in the evaluations' group (offline unless WANDB_MODE says)."""

    import wandb  # deferred: heavy, only for plots / wandb

    group = next((row["group"] for row in rows if row.get("group")), None)
    columns = [*FIRST_COLUMNS, *metric_names(rows)]
    run = wandb.init(project=project, group=group, job_type="evaluate-table", dir=str(directory),
                     mode=os.environ.get("WANDB_MODE", "offline"), name=f"table {directory.name}",
                     reinit="finish_previous")
    try:
        run.log({"sampler_table": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows]),
                 "quality_vs_nfe": wandb.Image(str(plot))})
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Table and quality-vs-NFE curve of an evaluation sweep")
    parser.add_argument("directory", help="a directory holding metrics.json files (an evaluate.py -m sweep)")
    parser.add_argument("--metric", default=None, help="the metric of the curve (default: the Fréchet distance)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the table and the curve to wandb")
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    rows = collect(directory)
    if not rows:
        raise SystemExit(f"error: no {METRICS_FILE} under {directory}: give the directory of an evaluate.py sweep")
    print(format_table(rows))
    metric = args.metric or default_metric(rows)
    plot = write_plot(rows, metric, directory / "quality_vs_nfe.png")
    print(f"{metric} against NFE: {plot}")
    if not args.no_wandb:
        log_wandb(rows, plot, directory)


if __name__ == "__main__":
    main()
