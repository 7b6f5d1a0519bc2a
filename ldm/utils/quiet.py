"""Known-harmless library messages, silenced one by one so that every other warning still shows.

Only the standard library is imported here: this runs on `import ldm`, before Hydra parses the
arguments, so it must not load torch or Lightning (that would make `--help` slow)."""

from __future__ import annotations

import logging
import warnings

# (message regex, category, module regex of the code that warns, why it is harmless)
KNOWN_WARNINGS = [
    # the frozen stages (autoencoder, frozen text towers) are kept in eval mode on purpose
    # (LatentDiffusion.train); the model summary still counts the modules in eval mode
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning, r"lightning\.pytorch"),
    # Lightning's own pytree helper builds a LeafSpec, which torch deprecated; nothing of ours uses it
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch"),
    # the model summary's size estimate under bf16 autocast (the default on GPUs and CPUs with bf16 units):
    # the weights are float32 under mixed precision, so the 32-bit estimate it falls back to is the right one
    (r"Precision bf16-mixed is not supported by the model summary", UserWarning, r"lightning\.pytorch"),
    # the streamed latent shards (ldm/data/streaming.py) know their exact length per rank and worker
    (r"Your `IterableDataset` has `__len__` defined", UserWarning, r"lightning\.pytorch"),
    # after a resume mid-epoch: Lightning looks for a state_dict on the DataLoader itself, but the data position
    # travels in the checkpoint through the DataModule's state_dict, and ldm/data/order.py continues the epoch
    # with exactly the batches an uninterrupted run sees (tests/test_resume.py)
    (r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
     UserWarning, r"lightning\.pytorch"),
]

# info lines Lightning logs on every run to advertise its cloud products (litlogger, litmodels):
# (logger, message prefix); Lightning has no switch for them
KNOWN_LOG_LINES = [
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),
]


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_known_warnings() -> None:
    """Install the filters above (idempotent: filterwarnings replaces a duplicate, loggers are checked)."""
    # `import lightning` gives the "lightning" logger a console handler of its own; imported after Hydra has
    # set up logging (the entry points import it late, for a fast --help), its records would also reach
    # Hydra's handlers and every Lightning line would be printed twice
    logging.getLogger("lightning").propagate = False
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in KNOWN_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
