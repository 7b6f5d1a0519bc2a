"""The devices a config asks for, against Lightning's names and what this machine has.

Lightning checks these only when the trainer is built, after the run directory, the loggers and the data
exist; here they are refused before any work, with the names Lightning knows and what is available.
"""

from __future__ import annotations

import importlib.util

import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

from ldm.checks.findings import UNKNOWN, Findings, is_int

GPU_ACCELERATORS = ("cuda", "mps")  # what Lightning's "gpu" means, in its order of preference
# Lightning strategies and precisions (by name prefix) that import a package of their own when the trainer starts
PACKAGES = {"deepspeed": "deepspeed", "xla": "torch_xla", "single_xla": "torch_xla", "single_tpu": "torch_xla",
            "transformer-engine": "transformer_engine"}


def accelerator_problems(found: Findings, prefix: str = "trainer.") -> None:
    """`{prefix}accelerator` names one Lightning has and this machine can use; `{prefix}devices` fits it."""
    key = f"{prefix}accelerator"
    accelerator = found.value(key, "auto")
    if accelerator is UNKNOWN or accelerator == "auto" or not isinstance(accelerator, str):
        return
    names = sorted(AcceleratorRegistry.available_accelerators())
    if accelerator != "gpu" and accelerator not in names:
        found.add(f"{key}={accelerator} is not an accelerator: use auto (a GPU when there is one, else the CPU) or "
                  f"one of {', '.join(['gpu', *names])}", key=key)
        return
    candidates = GPU_ACCELERATORS if accelerator == "gpu" else (accelerator,)
    usable = [name for name in candidates if AcceleratorRegistry[name]["accelerator"].is_available()]
    if not usable:
        found.add(f"{key}={accelerator}: this machine has no {accelerator.upper()} device (torch sees none); use "
                  f"{key}=cpu, or auto (a GPU when there is one, else the CPU)", key=key)
        return
    devices = found.value(f"{prefix}devices")
    if usable[0] == "cuda" and is_int(devices) and devices > torch.cuda.device_count():
        found.add(f"{prefix}devices={devices} but this machine has {torch.cuda.device_count()} CUDA devices: use at "
                  f"most {torch.cuda.device_count()}, or -1 (all)", key=f"{prefix}devices")


def strategy_name_problems(found: Findings, prefix: str = "trainer.") -> None:
    """`{prefix}strategy` given as a name must be one of Lightning's."""
    key = f"{prefix}strategy"
    strategy = found.value(key, "auto")
    if not isinstance(strategy, str) or strategy == "auto":
        return
    names = StrategyRegistry.available_strategies()
    if strategy not in names:
        common = [name for name in ("ddp", "fsdp", "deepspeed", "single_device") if name in names]
        found.add(f"{key}={strategy} is not a Lightning strategy: use auto (one device), or one of "
                  f"{', '.join(common)} (trainer=ddp, trainer=fsdp set them up)", key=key)
        return
    package = next((package for prefix, package in PACKAGES.items() if strategy.startswith(prefix)), None)
    if package is not None and importlib.util.find_spec(package) is None:
        found.add(f"{key}={strategy} needs the Python package {package}, which is not installed: install it, or use "
                  "trainer=ddp / trainer=fsdp", key=key)


def precision_package_problems(found: Findings, prefix: str = "trainer.") -> None:
    """A precision plugin from a package that is not installed (NVIDIA's transformer_engine)."""
    key = f"{prefix}precision"
    precision = found.value(key)
    package = next((package for name, package in PACKAGES.items()
                    if isinstance(precision, str) and precision.startswith(name)), None)
    if package is not None and importlib.util.find_spec(package) is None:
        found.add(f"{key}={precision} needs the Python package {package}, which is not installed: use "
                  f"{key}=auto (bf16 autocast where the device has it)", key=key)
