"""Bad inputs a new user meets, many from the libraries underneath (Lightning, Hydra, torch's AdamW, wandb, PIL):
each gives one `error:` line naming the key, the value and what would be right, before any work.

Most rows run the check the command runs (a composed config through `check_training`, the command line
through `override_problems`, the run directory through `location_problems`): milliseconds each. The rows in
ENTRY_POINT run through the real `train.py` (several in one process, tests/entry_points.py, and one in a process
of its own): exit status 2, no traceback, and no file left behind (the folder that holds runs/, .cache/, the
working directory and HOME, wandb's files included, listed before and after).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose_config
from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import OmegaConf
from PIL import Image

from ldm.checks.evaluation import evaluation_problems
from ldm.checks.hydra import location_problems
from ldm.checks.overrides import override_problems
from ldm.checks.sampling import sampling_problems
from ldm.checks.training import check_training
from ldm.utils.errors import ConfigError

FOLDER = ["data=folder", "autoencoder=kl_shapes", "conditioner=clip_text_tiny"]  # an RGB data set with captions



@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    for name in ("cuda", "mps"):
        monkeypatch.setattr(AcceleratorRegistry[name]["accelerator"], "is_available", staticmethod(lambda: False))


def image_folder(folder: Path, count: int, listed: int | None = None, captions: str = "metadata") -> Path:
    """`count` small RGB images with captions: metadata.jsonl listing the first `listed`, or a .txt beside each."""
    folder.mkdir(parents=True)
    lines = []
    for i in range(count):
        Image.new("RGB", (24, 24), (3 * i, 90, 200)).save(folder / f"{i:03d}.png")
        if captions == "txt":
            (folder / f"{i:03d}.txt").write_text(f"picture {i}")
        elif listed is None or i < listed:
            lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"picture {i}"}))
    if captions == "metadata":
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The files and folders the rows name ({name} in a row); 70 images are one default batch (64) after the
    validation share, so only the planted mistake is wrong."""
    root = tmp_path_factory.mktemp("inputs")
    corrupt = image_folder(root / "corrupt", 70)
    (corrupt / "013.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    truncated = image_folder(root / "truncated", 70)
    whole = (truncated / "021.png").read_bytes()
    (truncated / "021.png").write_bytes(whole[: len(whole) // 2])
    text_layout = image_folder(root / "text_layout", 70, captions="txt")
    (text_layout / "005.png").write_text("a caption saved under the image's name")
    image_folder(root / "unlisted", 70, listed=69)
    image_folder(root / "small", 40)
    (root / "a_file").write_text("not a folder")
    (root / "a_dir").mkdir()
    (root / "a_run" / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_config(TINY), root / "a_run" / ".hydra" / "config.yaml")
    return {path.name: path for path in root.iterdir()}


def filled(arguments: list[str], files: dict[str, Path]) -> list[str]:
    return [argument.format(**files) for argument in arguments]


def one_error(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


# (overrides of `python train.py`, environment, a part of the one expected message)
TRAINING = [
    # Lightning's trainer values
    (["trainer.precision=bf17"], {}, "trainer.precision=bf17 is not one of auto, 64, 32, 16, bf16,"),
    (["trainer.max_time='one hour'"], {}, "trainer.max_time=one hour is not a time: give DD:HH:MM:SS"),
    (["trainer.max_time='01:00'"], {}, "trainer.max_time=01:00 is not a time: give DD:HH:MM:SS, e.g. "
                                       "trainer.max_time=00:12:00:00 for 12 hours"),
    (["trainer.max_time={{hour: 1}}"], {}, "trainer.max_time={{'hour': 1}} is not a time"),
    (["trainer.val_check_interval=abc"], {}, "trainer.val_check_interval=abc is not a time: give DD:HH:MM:SS"),
    (["trainer.accelerator=cuda"], {}, "trainer.accelerator=cuda: this machine has no CUDA device (torch sees none); "
                                       "use trainer.accelerator=cpu"),
    (["trainer.accelerator=gpu"], {}, "trainer.accelerator=gpu: this machine has no GPU device"),
    (["trainer.accelerator=tpu"], {}, "trainer.accelerator=tpu: this machine has no TPU device"),
    (["trainer.accelerator=npu"], {}, "trainer.accelerator=npu is not an accelerator: use auto"),
    (["trainer.strategy=foo"], {}, "trainer.strategy=foo is not a Lightning strategy: use auto (one device), or one of "
                                   "ddp, fsdp"),
    (["trainer.strategy=deepspeed"], {}, "trainer.strategy=deepspeed needs the Python package deepspeed, which is not "
                                         "installed"),
    (["trainer.precision=transformer-engine"], {}, "trainer.precision=transformer-engine needs the Python package "
                                                   "transformer_engine"),
    (["trainer.devices=abc"], {}, "trainer.devices=abc is not a device count: give a number of devices"),
    (["trainer.max_steps=-1"], {}, "trainer.max_steps=-1 with trainer.max_epochs=-1 and trainer.max_time=null never "
                                   "stops"),
    (["+trainer.profiler=foo"], {}, "trainer.profiler=foo is not one of simple, advanced, pytorch, xla"),
    (["+trainer.deterministic=maybe"], {}, "trainer.deterministic=maybe is not one of true, false, warn"),
    (["+trainer.gradient_clip_algorithm=max"], {}, "trainer.gradient_clip_algorithm=max is not one of norm, value"),
    (["+trainer.enable_progress_bar=false"], {}, "trainer.enable_progress_bar=false but callbacks.progress sets a "
                                                 "progress bar (Lightning refuses both): switch it off with "
                                                 "callbacks.progress=null"),
    # torch's AdamW
    (["optimizer.betas=[0.9,abc]"], {}, "optimizer.betas='abc' is not a number: the two decays"),
    (["optimizer.betas=[0.9]"], {}, "optimizer.betas=[0.9] has 1 values: give 2"),
    (["optimizer.betas=[0.9,1.0]"], {}, "optimizer.betas=1.0 must be in [0, 1)"),
    (["optimizer.fused=maybe"], {}, "optimizer.fused=maybe is not one of true, false"),
    (["+optimizer.amsgrad=yes"], {}, "optimizer.amsgrad=yes is not one of true, false"),
    (["+optimizer.maximize=true"], {}, "optimizer.maximize=true would make the optimizer climb the training loss"),
    # the run's own keys
    (["seed=-1"], {}, "seed=-1 must be in [0, 4294967295]: a seed is a whole number from 0 to 2**32 - 1"),
    (["seed=4294967296"], {}, "seed=4294967296 must be in [0, 4294967295]"),
    (["resume={a_dir}"], {}, "resume={a_dir} is a directory: give a checkpoint file, e.g. "
                             "resume={a_dir}/checkpoints/last.ckpt (or init_from={a_dir}"),
    (["autoencoder.weights={a_dir}"], {}, "autoencoder.weights={a_dir}: '{a_dir}' is a directory, but autoencoder=kl "
                                          "reads one .safetensors file"),
    (["lr_scheduler.warmup_steps=1.5"], {}, "lr_scheduler.warmup_steps=1.5 is not a whole number: use 0 (none) or a "
                                            "step count"),
    (["data.image_size=100000"], {}, "data.image_size=100000: the digits data set keeps its 1497 images in memory "
                                     "(float32), 59,880 GB at this size"),
    # wandb
    (["logger=wandb"], {"WANDB_MODE": "online", "WANDB_API_KEY": None},
     "WANDB_MODE=online with logger=wandb: no wandb API key for"),
    (["logger=wandb"], {"WANDB_MODE": "online", "WANDB_API_KEY": "abc"},
     "WANDB_MODE=online with logger=wandb: wandb refuses the credentials (WANDB_API_KEY invalid"),
    (["logger=wandb"], {"WANDB_MODE": "bogus"}, "WANDB_MODE=bogus is not a wandb mode: use offline"),
    (["logger.wandb.project=me/ldm"], {}, "logger.wandb.project=me/ldm: wandb refuses it: Invalid project name"),
    (["logger.wandb.tags=baseline"], {}, "logger.wandb.tags=baseline is one string, not a list (each letter would be a "
                                         "tag): write logger.wandb.tags=[baseline]"),
    (["logger.wandb.tags=[" + "x" * 70 + "]"], {}, "is 70 characters. Tags must be between 1 and 64 characters"),
    # a folder of images
    ([*FOLDER, "root={corrupt}"], {}, "root={corrupt}: 1 of 70 images cannot be read (013.png; 013.png: cannot "
                                      "identify image file"),
    ([*FOLDER, "root={truncated}"], {}, "root={truncated}: 1 of 70 images cannot be read (021.png;"),
    ([*FOLDER, "root={text_layout}"], {}, "root={text_layout}: 1 of 70 images cannot be read (005.png;"),
    ([*FOLDER, "root={unlisted}"], {}, "root={unlisted}: 1 images are not listed in metadata.jsonl (069.png), so they "
                                       "have no caption"),
    ([*FOLDER, "root={small}"], {}, "data.batch_size=64 needs 64 training images for one optimizer step, but there "
                                    "are 38 of root={small} (after data.val_fraction=0.05): use data.batch_size=38"),
    ([*FOLDER, "root={small}", "data.batch_size=16", "trainer.accumulate_grad_batches=4"], {},
     "data.batch_size=16 x trainer.accumulate_grad_batches=4 needs 64 training images"),
    ([*FOLDER, "root={small}", "data.val_fraction=0.99"], {},
     "data.val_fraction=0.99 leaves no training images: all 40 images of root={small} go to validation"),
]


@pytest.mark.parametrize("overrides,env,message", TRAINING,
                         ids=[" ".join(o + [f"{k}={v}" for k, v in e.items()]) for o, e, _ in TRAINING])
def test_training_mistake_gives_one_message(overrides, env, message, files, no_model, no_gpu, monkeypatch):
    if (package := re.search(r"needs the Python package (\w+)", message)) and find_spec(package.group(1)):
        pytest.skip(f"{package.group(1)} is installed here")
    for key, value in env.items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(files["a_dir"]))  # no wandb login of this machine's user
    cfg = compose_config(filled(overrides, files))
    with pytest.raises(ConfigError) as caught:
        check_training(cfg)
    assert message.format(**files) in one_error(caught.value.errors)


# (config, command line, a part of the one expected message): what Hydra itself refuses
COMMAND_LINES = [
    ("train", ["model=ditt"], "model=ditt: model has no option ditt; did you mean model=dit? the options are dit, "),
    ("train", ["foo=1"], "foo=1: the config has no key foo; to add a key it does not have, write +foo=1"),
    ("train", ["model.hidden_sise=64"], "model.hidden_sise=64: the config has no key model.hidden_sise; did you mean "
                                        "model.hidden_size?"),
    ("train", ["optimizer.betas=[0.9,"], "optimizer.betas=[0.9,: Hydra cannot read this override"),
    ("train", ["model.depth=2,3"], "model.depth=2,3: values with commas are a sweep, which needs -m"),
    ("train", ["+seed=1"], "+seed=1: the config has seed already; to change it write seed=1"),
    ("train", ["-m", "schedule=flow,vv"], "schedule=vv: schedule has no option vv; did you mean schedule=v?"),
    ("sample", ["run=RUN", "sampler=eulr"], "sampler=eulr: sampler has no option eulr; did you mean sampler=euler?"),
    ("evaluate", ["run=RUN", "metrics=fid"], "metrics=fid: metrics has no option fid"),
]


@pytest.mark.parametrize("config,arguments,message", COMMAND_LINES,
                         ids=[f"{c} {' '.join(a)}" for c, a, _ in COMMAND_LINES])
def test_command_line_hydra_refuses_gives_one_message(config, arguments, message):
    assert message in one_error(override_problems(arguments, config))


def test_command_lines_hydra_takes_pass():
    for config, arguments in (("train", ["model=unet", "+trainer.profiler=simple", "~trainer.gradient_clip_val"]),
                              ("train", ["-m", "schedule=flow,v", "model.depth=2,3"]),
                              ("train", ["hparams_search=digits_optuna", "-m"]),
                              ("train", ["--help"]), ("sample", ["run=RUN", "sampler=heun"])):
        assert override_problems(arguments, config) == [], arguments


def test_sampling_and_evaluation_refuse_what_lightning_and_numpy_would(files, no_gpu, no_model):
    run = files["a_run"]  # what the checks read of a run: its config
    assert one_error(sampling_problems(compose_config([f"run={run}", "seed=-1"], name="sample"))).startswith(
        "seed=-1 must be in [0, 4294967295]")
    assert one_error(evaluation_problems(compose_config([f"run={run}", "accelerator=cuda"], name="evaluate"))
                     ).startswith("accelerator=cuda: this machine has no CUDA device")
    assert one_error(evaluation_problems(compose_config([f"run={run}", "strategy=ddpp"], name="evaluate"))
                     ).startswith("strategy=ddpp is not a Lightning strategy")


def unwritable_folder(tmp_path: Path) -> Path | None:
    """A folder this process cannot make anything in (root ignores permission bits: a path under /sys then)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for candidate in (locked, Path("/sys")):
        try:
            (candidate / "probe").mkdir()
        except OSError:
            return candidate
        (candidate / "probe").rmdir()
    return None


def test_a_run_directory_that_cannot_be_made_is_refused(files, tmp_path):
    assert one_error(location_problems("hydra.run.dir", files["a_file"])) == (
        f"hydra.run.dir={files['a_file']} is a file; give a folder path (hydra.run.dir=DIR)")
    assert one_error(location_problems("hydra.run.dir", files["a_file"] / "run")).startswith(
        f"hydra.run.dir={files['a_file'] / 'run'} cannot be made: {files['a_file']} is a file, not a folder")
    locked = unwritable_folder(tmp_path)
    if locked is None:
        pytest.skip("every folder is writable here")
    assert one_error(location_problems("hydra.run.dir", locked / "runs" / "x")).startswith(
        f"hydra.run.dir={locked / 'runs' / 'x'} cannot be made: {locked} is not writable")
    assert location_problems("hydra.run.dir", tmp_path / "new" / "run") == []
    assert sorted(tmp_path.iterdir()) == [tmp_path / "locked"]  # the write probe is gone again


# ---- through train.py: exit status 2, no traceback, nothing left behind ------------------------------------------

# (arguments of `python train.py`, environment, a part of the one expected message); {root} is the test's folder
ENTRY_POINT = [
    (["trainer.precision=bf17"], {}, "trainer.precision=bf17 is not one of"),
    (["trainer.max_time=one hour"], {}, "trainer.max_time=one hour is not a time: give DD:HH:MM:SS"),
    (["seed=-1"], {}, "seed=-1 must be in [0, 4294967295]"),
    (["optimizer.betas=[0.9,abc]"], {}, "optimizer.betas='abc' is not a number"),
    (["trainer.accelerator=cuda"], {}, "trainer.accelerator=cuda: this machine has no CUDA device"),
    (["logger=wandb"], {"WANDB_MODE": "online", "WANDB_API_KEY": None}, "WANDB_MODE=online with logger=wandb: no wandb "
                                                                        "API key"),
    (["model=ditt"], {}, "model=ditt: model has no option ditt"),
    (["hydra.run.dir={a_file}/run"], {}, "hydra.run.dir={a_file}/run cannot be made: {a_file} is a file"),
    (["hydra.run.dir={locked}/run"], {}, "hydra.run.dir={locked}/run cannot be made: {locked} is not writable"),
    ([*FOLDER, "root={corrupt}"], {}, "root={corrupt}: 1 of 70 images cannot be read"),
    ([*FOLDER, "root={small}"], {}, "data.batch_size=64 needs 64 training images for one optimizer step"),
]


def assert_one_error(status: int, stderr: str, message: str) -> None:
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], stderr[-3000:]


def environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LDM_DEBUG", "WANDB_MODE")}
    # runs/, .cache/, HOME (wandb's settings) and the working directory all in the folder that is listed, but
    # matplotlib's font cache (made once per user on its first import, by any program) elsewhere; no GPU
    # visible, so that trainer.accelerator=cuda is a mistake on every machine
    env.update(PYTHONPATH=str(ROOT), LDM_ROOT=str(root), HOME=str(root), MPLCONFIGDIR=str(root.parent / "matplotlib"),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def test_train_command_refuses_without_traceback_or_leftovers(files, tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    locked = unwritable_folder(tmp_path) or tmp_path / "writable"
    names = {**files, "locked": locked, "root": root}
    rows = [row for row in ENTRY_POINT if "{locked}" not in row[0][0] or locked.name != "writable"]
    watched = [str(root), str(files["a_file"].parent)]
    jobs = [{"script": str(ROOT / "train.py"), "arguments": filled(arguments, names), "env": env, "watch": watched}
            for arguments, env, _ in rows]
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "entry_points.py")], input=json.dumps(jobs),
                            cwd=root, env=environment(root), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    assert len(outcomes) == len(rows) >= len(ENTRY_POINT) - 1
    for (arguments, _, message), outcome in zip(rows, outcomes, strict=True):
        assert_one_error(outcome["status"], outcome["stderr"], message.format(**names))
        assert outcome["created"] == [] and outcome["removed"] == [], (arguments, outcome)


def test_a_failed_start_in_a_process_of_its_own(files, tmp_path):
    """As a user runs it, in a fresh process: a mistake Hydra itself would report (its own message, exit 1)."""
    root = tmp_path / "work"
    root.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "model.hidden_sise=64"], cwd=root,
                            env=environment(root), capture_output=True, text=True, timeout=300)
    assert_one_error(result.returncode, result.stderr, "model.hidden_sise=64: the config has no key model.hidden_sise; "
                                                       "did you mean model.hidden_size?")
    assert list(root.iterdir()) == []
