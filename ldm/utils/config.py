"""OmegaConf resolvers used by the configs (registered on `import ldm`), and the checks they share."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

#: where the package's own files live; its parent is the project when running from a source checkout
PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: the project's configs (conf/train.yaml and its groups)
CONF = PACKAGE_DIR.parent / "conf"


def latent_size(image_size: int, downsample: int) -> int:
    """The latent side of `image_size` images under the autoencoder's downsampling factor; it must divide."""
    image_size, downsample = int(image_size), int(downsample)
    if image_size % downsample:
        lower, upper = image_size // downsample * downsample, (image_size // downsample + 1) * downsample
        suggestion = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"data.image_size={image_size} is not divisible by the autoencoder's downsampling factor "
                         f"(autoencoder.downsample={downsample}): use a multiple of {downsample}, e.g. {suggestion}")
    return image_size // downsample


def checkout_root(package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source checkout holding the package (the folder with conf/train.yaml beside `ldm/`), or None."""
    root = package_dir.parent
    return root if (root / "conf" / "train.yaml").is_file() else None


def ldm_root() -> str:
    """Where runs/ and the cache go: $LDM_ROOT, else the source checkout, else (installed) the working directory.

    Absolute, so that a run's paths do not depend on where a later command is started from."""
    if os.environ.get("LDM_ROOT"):
        return str(Path(os.environ["LDM_ROOT"]).expanduser().resolve())
    return str(checkout_root() or Path.cwd())


def loader_workers(most: int = 8) -> int:
    """Data-loading processes for this machine: one per CPU core this process may use (its affinity: what SLURM
    or a container grants), less one for the training process, at most `most`; 0 (load in the main process) on
    one core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(int(most), cores - 1))


def register_resolvers() -> None:
    # `floordiv` is the name saved in run directories' configs, so it stays although it checks more
    if not OmegaConf.has_resolver("floordiv"):
        OmegaConf.register_new_resolver("floordiv", latent_size)
    # `${ldm_root:}` is saved in run directories' configs too: the name stays
    if not OmegaConf.has_resolver("ldm_root"):
        OmegaConf.register_new_resolver("ldm_root", ldm_root)
    # `${loader_workers:}`: data.num_workers from the machine's cores (saved in run directories' configs)
    if not OmegaConf.has_resolver("loader_workers"):
        OmegaConf.register_new_resolver("loader_workers", loader_workers)
