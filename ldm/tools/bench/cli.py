"""`python -m ldm.tools.bench`: the arguments, the run over the chosen groups, the table and the JSON file."""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch

from ldm.tools.bench import autoencoders, callbacks, data, denoisers, finetune, sampling
from ldm.tools.bench.measure import Comparison, measure, release
from ldm.tools.bench.peak import measure_peaks
from ldm.tools.bench.report import compare, read_json, table, write_json
from ldm.tools.bench.timing import PRECISIONS
from ldm.utils.errors import UserError, reported_user_errors

GROUPS = ("denoisers", "autoencoders", "sampling", "data", "callbacks", "finetune")
# batch sizes that keep the whole bench to a few minutes on a 2-core CPU
BATCH_SIZES = {"dit_s": 16, "dit_b": 4, "dit_l": 2, "dit_xl": 2, "unet": 8, "vae": 2, "sampling": 8, "data": 32}
# --quick: the default run's callback, small
QUICK_RUN = ["data.batch_size=8", "callbacks.sample_metrics.num_samples=8", "diffusion.sample_steps=2"]
QUICK = {"steps": 1, "warmup": 0, "batch_size": 2, "dit": ["dit_s"], "nfe": 3, "peak_size": 1024,
         "peak_repeats": 2}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.tools.bench", description=(
        "Step times of the project against the reference implementations, alternated step by step in one "
        "process and reported as ratios, with FLOPs and MFU against the measured matmul peak."))
    p.add_argument("--steps", type=int, default=5, help="timed steps per member and precision (median)")
    # train steps settle over the first few rounds (allocator, caches) on both sides of a pair: 1 left DiT-B's
    # ratio swinging between 0.8 and 1.15 from run to run
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before them (the FLOP count is one more)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"one batch size for every pair; default per pair: {BATCH_SIZES}")
    p.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16"],
                   help="bf16 runs under autocast, on the CPU as on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="the groups to run")
    p.add_argument("--dit", nargs="+", choices=denoisers.DIT_SIZES, default=["dit_s", "dit_b"],
                   help="DiT sizes (patch 2, 32x32x4 latents)")
    p.add_argument("--unet-channels", type=int, default=64, help="the SD 1.x UNet's base width (320 in SD)")
    p.add_argument("--compile", action="store_true",
                   help="the project's denoisers torch.compiled per block, as model.compile=true (diffusers eager)")
    p.add_argument("--nfe", type=int, default=9, help="network calls per sampling run")
    p.add_argument("--peak-size", type=int, default=None, help="matmul size of the peak (2048 CPU, 8192 CUDA)")
    p.add_argument("--peak-repeats", type=int, default=5, help="runs of the peak matmul; the best counts")
    p.add_argument("--json", default="outputs/bench.json", help="where the results go")
    p.add_argument("--compare", nargs="+", metavar=("OLD.json", "NEW.json"), default=None,
                   help="print the change against an earlier result; with two files, compare them and run nothing")
    p.add_argument("--quick", action="store_true", help=f"a short smoke run; unless given: {QUICK}")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    arguments = parser()
    args = arguments.parse_args(argv)
    if args.quick:  # its values replace the defaults only, not what was given
        for key, value in QUICK.items():
            if getattr(args, key) == arguments.get_default(key):
                setattr(args, key, value)
    if args.compare is not None and len(args.compare) > 2:
        raise UserError(f"--compare takes OLD.json or OLD.json NEW.json, got {len(args.compare)} files")
    if args.steps < 1 or args.warmup < 0 or args.nfe < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise UserError(f"need --steps >= 1, --warmup >= 0, --nfe >= 1 and --batch-size >= 1, got {args.steps}, "
                        f"{args.warmup}, {args.nfe}, {args.batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return args


def batch(args: argparse.Namespace, name: str) -> int:
    return args.batch_size or BATCH_SIZES[name]


def comparisons(group: str, args: argparse.Namespace, device: torch.device, skipped: list[str]
                ) -> Iterator[Comparison]:
    """A group's comparisons, each built only when the previous one is measured and released."""
    if group == "denoisers":
        for size in args.dit:
            yield denoisers.dit_pair(size, batch(args, size), device, compile=args.compile)
        yield denoisers.unet_pair(batch(args, "unet"), device, channels=args.unet_channels, compile=args.compile)
        yield denoisers.optimizer_comparison(args.dit[-1], device)
    elif group == "autoencoders":
        reason = autoencoders.available()
        if reason is None:
            yield autoencoders.vae_pair(batch(args, "vae"), device)
        else:
            skipped.append(f"autoencoders: {reason}")
    elif group == "sampling":
        yield sampling.samplers_comparison(batch(args, "sampling"), device, nfe=args.nfe)
        yield sampling.guidance_comparison(batch(args, "sampling"), device, nfe=args.nfe)
    elif group == "data":
        yield from data.comparisons(batch(args, "data"), device)


def meta(args: argparse.Namespace, device: torch.device) -> dict:
    """What the numbers depend on, so that a later comparison can tell a machine change from a code change."""
    import diffusers  # deferred: diffusers is heavy and optional

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "args": {key: value for key, value in vars(args).items() if key != "compare"}}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as training does (ldm/commands/train.py); both sides of every row alike
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    peaks = measure_peaks(args.precision, device, peak_size, args.peak_repeats)
    rows: list[dict] = []
    skipped: list[str] = []
    print(f"device {device}, {torch.get_num_threads()} threads, precisions {' '.join(args.precision)}, "
          f"median of {args.steps} steps after {args.warmup} warm-up rounds", flush=True)
    for group in args.only:
        if group == "callbacks":
            print("  callbacks: sample metrics of the default run ...", flush=True)
            rows += callbacks.sample_metrics_rows(args.precision, args.steps, args.warmup, device, peaks,
                                                  QUICK_RUN if args.quick else [])
            release()
            continue
        if group == "finetune":
            print("  finetune: LoRA against full fine-tuning of the default run ...", flush=True)
            rows += finetune.finetune_rows(args.precision, args.steps, args.warmup, device, peaks, args.batch_size)
            release()
            continue
        for comparison in comparisons(group, args, device, skipped):
            print(f"  {group}: {comparison.name} ...", flush=True)
            rows += measure(comparison, args.precision, args.steps, args.warmup, device, peaks)
            del comparison
            release()
    for line in skipped:
        print(f"skipped {line}")
    print(table(rows, peaks))
    document = {"meta": meta(args, device), "peak_flops": peaks, "skipped": skipped, "results": rows}
    write_json(args.json, document["meta"], peaks, rows, skipped)
    print(f"results written to {args.json}")
    return document


def main(argv: list[str] | None = None) -> None:
    with reported_user_errors():
        args = parse(argv)
        if args.compare is not None and len(args.compare) == 2:
            print(compare(read_json(args.compare[0]), read_json(args.compare[1])))
            return
        old = read_json(args.compare[0]) if args.compare else None  # a bad file fails before the long run
        new = run(args)
        if old is not None:
            print(f"change against {args.compare[0]}:")
            print(compare(old, new))
