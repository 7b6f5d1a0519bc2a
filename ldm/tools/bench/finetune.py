"""LoRA against full fine-tuning of the default digits run: the training step's time and peak memory, in one process.

Both members are LatentDiffusion's training step (forward, loss, backward, the configured AdamW update) on the
same batch of the default run's data: one with finetune=lora (the adapters train on a frozen base), one training
every weight. The base's values do not matter for either cost, so it is the random initial one. Peak memory is
the highest total of torch's profiler memory timeline over one step: the tensors the step uses that existed before
it (weights, optimizer state) and all it allocates (gradients, activations, temporaries), on the CPU as on a GPU.
torch's MemTracker would count the same but refuses frozen parameters, and the memory snapshots torch now points
to instead of the timeline see CUDA only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from torch.profiler import ProfilerActivity, profile

from ldm.tools.bench.data import build_training
from ldm.tools.bench.flops import count_flops
from ldm.tools.bench.measure import Member, side
from ldm.tools.bench.timing import alternate, median, precision_context

MEMBERS = {"finetune=lora": ["finetune=lora"], "finetune=full": []}
# the default run's denoiser, and a larger one on the same data: LoRA saves the base's weight gradients and
# optimizer update, which weigh more the larger the layers are against the activations
MODELS = {"default digits run (DiT)": ([], None), "digits with model=dit_b": (["model=dit_b"], 32)}


def peak_memory(step, device: torch.device, precision: str) -> int:
    """Bytes held at the step's peak: the tensors it uses from before (weights, optimizer state), all it allocates."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as profiler:
        with precision_context(precision, device):
            step()
    with TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.json"
        name = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # see the module's docstring
            profiler.export_memory_timeline(str(path), device=name)
        _, sizes = json.loads(path.read_text())  # per instant: bytes in each category
    return int(max(sum(categories) for categories in sizes))


def finetune_rows(precisions: list[str], steps: int, warmup: int, device: torch.device, peaks: dict[str, float],
                  batch_size: int | None = None, models: dict = MODELS) -> list[dict]:
    """One row per model and precision: LoRA's step time and peak memory against full fine-tuning's."""
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    rows = []
    with TemporaryDirectory() as cache_dir:
        for name, (overrides, batch) in models.items():
            batch = batch_size or batch
            common = ["logger=none", "data.cache=true", *overrides] + ([f"data.batch_size={batch}"] if batch else [])
            built = {label: build_training(common + extra, cache_dir, device) for label, extra in MEMBERS.items()}
            rows += _rows(name, built, precisions, steps, warmup, device, peaks)
            del built
    return rows


def _rows(name: str, built: dict, precisions: list[str], steps: int, warmup: int, device: torch.device,
          peaks: dict[str, float]) -> list[dict]:
    cfg = built["finetune=full"][0]
    batch = int(cfg.data.batch_size)
    steps_of = {label: parts[3] for label, parts in built.items()}
    flops = {label: count_flops(step) for label, step in steps_of.items()}  # also the first (warm-up) step
    trained = {label: sum(p.numel() for p in parts[1].parameters() if p.requires_grad)
               for label, parts in built.items()}
    rows = []
    for precision in precisions:
        times = alternate(steps_of, steps, warmup, device, precision)
        memory = {label: peak_memory(step, device, precision) for label, step in steps_of.items()}
        sides = {label: side(Member(label, steps_of[label], trained[label]), median(times[label]), flops[label], batch,
                             peaks[precision]) for label in MEMBERS}
        project, reference = sides["finetune=lora"], sides["finetune=full"]
        rows.append({"group": "finetune", "name": f"{name}: LoRA against full fine-tuning",
                     "precision": precision, "batch_size": batch, "steps": steps,
                     "note": "LatentDiffusion.training_step with the configured AdamW; params: the trained ones",
                     "project": project, "reference": reference, "ratio": project["seconds"] / reference["seconds"],
                     "memory": {"project": memory["finetune=lora"], "reference": memory["finetune=full"],
                                "ratio": memory["finetune=lora"] / memory["finetune=full"]}})
    return rows
