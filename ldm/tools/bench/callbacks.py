"""What the in-training evaluation costs: `callbacks.sample_metrics` at one validation against the training
steps between two validations, for the default run (digits, latent DiT, flow) with its own settings.

The two are alternated like any pair; the row puts `val_check_interval` training steps plus one evaluation
against the steps alone, so its ratio is the run's time with the callback over its time without.
"""

from __future__ import annotations

import warnings
from tempfile import TemporaryDirectory
from types import SimpleNamespace

import hydra
import torch

from ldm.tools.bench.data import build_training
from ldm.tools.bench.flops import count_flops
from ldm.tools.bench.measure import Member, side
from ldm.tools.bench.timing import alternate, median


def sample_metrics_rows(precisions: list[str], steps: int, warmup: int, device: torch.device,
                        peaks: dict[str, float], overrides: list[str] = ()) -> list[dict]:
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    with TemporaryDirectory() as cache_dir:
        cfg, module, datamodule, train_step, _ = build_training(["logger=none", *overrides], cache_dir, device)
        callback = hydra.utils.instantiate(cfg.callbacks.sample_metrics)
        callback.on_fit_start(SimpleNamespace(datamodule=datamodule), module)

        def evaluate() -> None:
            module.eval()
            callback.score(module)
            module.train()

        interval, batch = int(cfg.trainer.val_check_interval), int(cfg.data.batch_size)
        flops = {"train": count_flops(train_step), "metrics": count_flops(evaluate)}
        label = f"{interval} steps + sample_metrics ({callback.num_samples} samples)"
        rows = []
        for precision in precisions:
            times = alternate({"train": train_step, "metrics": evaluate}, steps, warmup, device, precision)
            step_s, metrics_s = median(times["train"]), median(times["metrics"])
            project = side(Member(label, train_step), interval * step_s + metrics_s,
                           interval * flops["train"] + flops["metrics"], interval * batch, peaks[precision])
            reference = side(Member(f"{interval} steps alone", train_step), interval * step_s,
                             interval * flops["train"], interval * batch, peaks[precision])
            rows.append({"group": "callbacks", "name": "default run: sample metrics at each validation",
                         "precision": precision, "batch_size": batch, "steps": steps,
                         "note": f"one validation's samples and scores per {interval} training steps",
                         "project": project, "reference": reference,
                         "ratio": project["seconds"] / reference["seconds"]})
        return rows
