"""Bad input gets one clear message before any work: configs, command-line arguments, files, data folders.

Most rows call the check on a composed config (milliseconds, with building any torch module made an
error); a few go through the real commands and also check the exit status, that no traceback is
printed, and that no run directory, cache or wandb run is left behind.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, compose_config
from forked import run
from omegaconf import OmegaConf
from PIL import Image

from ldm.checks.run_dir import run_dir_problems
from ldm.checks.sampling import check_sampling
from ldm.checks.training import check_training
from ldm.utils.errors import ConfigError


class ModelBuilt(AssertionError):
    pass



@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The files and folders the rows name: {name} in a row is replaced by its path."""
    tmp_path = tmp_path_factory.mktemp("inputs")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(70):  # one default batch (data=folder: 64) after the validation share
        Image.new("RGB", (40, 40), (3 * i, 0, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture number {i}")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "notes.ckpt").write_text("these are not weights")
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    torch.save({"state_dict": {}, "payload": ModelBuilt("x")}, tmp_path / "objects.ckpt")
    # what sample.py reads of a run before it is rebuilt: its config
    classifier = ["task=classifier", "data.batch_size=32", "data.cache=false"]
    for name, overrides in (("class_run", TINY), ("text_run", ["experiment=shapes_text"]),
                            # runs that guidance names: weaker models and classifiers that do not fit class_run
                            ("edm_run", TINY + ["schedule=edm"]), ("small_run", TINY + ["data.image_size=16"]),
                            ("uncond_run", TINY + ["conditioner=none"]), ("digits_classifier", classifier),
                            ("shapes_classifier", classifier + ["data=shapes", "autoencoder=kl_shapes"])):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        OmegaConf.save(compose_config(overrides), tmp_path / name / ".hydra" / "config.yaml")
    names = {"missing": tmp_path / "missing.ckpt"}
    names.update({p.stem if p.is_file() else p.name: p for p in tmp_path.iterdir()})
    return names


def filled(arguments: list[str], files: dict[str, Path]) -> list[str]:
    return [argument.format(**files) for argument in arguments]


# (overrides of `python train.py`, a part of the one expected message); every row holds one mistake
TRAINING = [
    # silent wrong results
    (["trainer.max_steps=0"], "trainer.max_steps=0 trains nothing"),
    (["trainer.max_steps=100"], "trainer.val_check_interval=500 is larger than trainer.max_steps=100"),
    (["lr_scheduler.warmup_steps=-5"], "lr_scheduler.warmup_steps=-5 must be at least 0"),
    (["model.depth=0"], "model.depth=0 must be at least 1"),
    # errors that came too late or unclear
    (["optimizer.lr=-0.001"], "optimizer.lr=-0.001 must be greater than 0"),
    (["optimizer.lr=0"], "optimizer.lr=0 must be greater than 0"),
    (["data.image_size=30"], "data.image_size=30 is not divisible by the autoencoder's downsampling factor"),
    (["schedule=ddpm", "schedule.num_timesteps=0"], "schedule.num_timesteps=0 must be at least 1"),
    (["resume={missing}"], "missing.ckpt: no such file"),
    (["resume={empty}"], "empty.ckpt: the file is empty (0 bytes"),
    (["resume={notes}"], "notes.ckpt: not a checkpoint"),
    (["resume={tensor}"], "tensor.ckpt: not a training checkpoint"),
    (["resume={objects}"], "objects.ckpt: the file holds objects other than tensors"),
    (["data.num_classes=5"], "data.num_classes=5 but DigitsDataset has labels 0..9 (10 classes)"),
    (["conditioner.embedders.0.num_classes=4"], "conditioner.embedders.0.num_classes=4 is fewer than the 10"),
    (["model=unet", "model.in_channels=3"], "model.in_channels=3 but the autoencoder makes 4-channel latents"),
    (["data=folder", "root={images}", "conditioner=clip_text_tiny"],
     "autoencoder.weights=digits_vae encodes 1-channel images, but data.channels=3"),
    (["data=folder", "root={images}", "autoencoder=kl_shapes", "conditioner=class"],
     "conditioner.embedders.0.input_key=label: the conditioner reads each item's 'label', but FolderDataset"),
    (["data=shapes", "autoencoder=kl_shapes", "conditioner=class"],
     "conditioner.embedders.0.input_key=label: the conditioner reads each item's 'label', but ShapesDataset"),
    (["conditioner=class_text"], "input_key=caption: the conditioner reads each item's 'caption', but DigitsDataset"),
    (["data=shapes", "autoencoder=kl_shapes", "conditioner=class_text"],
     "input_key=label: the conditioner reads each item's 'label', but ShapesDataset"),
    (["data=folder", "root={images}", "autoencoder=kl_shapes", "conditioner=clip_text_tiny", "data.val_fraction=0"],
     "data.val_fraction=0 must be in (0, 1): 0 leaves no validation images"),
    (["data=folder"], "root=null: this data set reads images from a folder"),
    (["data=folder", "root={missing}", "autoencoder=kl_shapes", "conditioner=none"], "missing.ckpt: no such directory"),
    (["data=folder", "root={empty_dir}", "autoencoder=kl_shapes", "conditioner=none"], "no captioned images in"),
    # more ranges, types and cross-group consistency
    (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be at least -1"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 must be at least 1: whole optimizer steps"),
    (["trainer.val_check_interval=1.5"], "trainer.val_check_interval=1.5 must be in (0, 1]: a float is a fraction"),
    (["optimizer.lr=fast"], "optimizer.lr='fast' is not a number"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1 must be at least 0"),
    (["lr_scheduler=warmup_cosine", "lr_scheduler.final_ratio=2"], "lr_scheduler.final_ratio=2 must be in [0, 1]"),
    (["schedule=edm", "schedule.sigma_min=100"], "schedule.sigma_min=100 must be smaller than schedule.sigma_max=80"),
    (["schedule.shift=0"], "schedule.shift=0 must be greater than 0"),
    (["model.patch_size=3"], "model.patch_size=3 does not divide the 8x8 latents"),
    (["model.hidden_size=130"], "model.hidden_size=130 is not divisible by model.num_heads=4"),
    (["model.input_size=16"], "model.input_size=16 but the latents are 8x8"),
    (["model=unet", "model.channel_mult=[1,2,2,2,2]"], "downsamples the latents by 16, which does not divide"),
    (["autoencoder=kl_shapes"], "autoencoder.weights=shapes_vae encodes 3-channel images, but data.channels=1"),
    (["autoencoder.weights=nowhere.safetensors"], "autoencoder.weights=nowhere.safetensors: autoencoder weights"),
    (["autoencoder.latent_channels=8"], "autoencoder.latent_channels=8 does not fit autoencoder.weights=digits_vae"),
    (["data.batch_size=0"], "data.batch_size=0 must be at least 1"),
    (["seed=abc"], "seed='abc' is not a whole number"),
    (["callbacks.ema.decay=1.5"], "callbacks.ema.decay=1.5 must be in [0, 1)"),
    (["callbacks.ema.decay=1.0"], "callbacks.ema.decay=1.0 must be in [0, 1)"),
    (["optimizer.lr=inf"], "optimizer.lr=inf is not a finite number"),
    (["callbacks.ema.decay=nan"], "callbacks.ema.decay=nan is not a finite number"),
    (["++trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 must be at least 1"),
    (["conditioner.embedders.0.drop_rate=2"], "conditioner.embedders.0.drop_rate=2 must be in [0, 1]"),
    (["diffusion.sample_steps=0"], "diffusion.sample_steps=0 must be at least 1"),
    (["trainer.max_steps=ten"], "trainer.max_steps='ten' is not a whole number"),
    (["+model.hidden_sise=64"], "model.hidden_sise: unknown key for ldm.models.dit.DiT; did you mean hidden_size?"),
]


@pytest.mark.parametrize("overrides,message", TRAINING, ids=[" ".join(o) for o, _ in TRAINING])
def test_training_config_mistake_gives_one_message(overrides, message, files, no_model):
    cfg = compose_config(filled(overrides, files))
    with pytest.raises(ConfigError) as caught:
        check_training(cfg)
    errors = caught.value.errors
    assert len(errors) == 1, errors
    assert message.format(**files) in errors[0], errors[0]


# (arguments of `python sample.py` besides run=, a part of the one expected message)
SAMPLING = [
    (["steps=0"], "steps=0 must be at least 1"),
    (["guidance=-1"], "guidance.scale=-1 must be at least 0"),
    (["n=0"], "n=0 must be at least 1"),
    (["run={text_run}", "prompts=a small red circle"], "prompts='a small red circle' is one string, not a list"),
    (["run={text_run}", "prompts=[]"], "prompts=[]: give a non-empty list of strings"),
    (["labels=[10]"], "labels=[10]: 10 is not a class of the run; it has classes 0..9"),
    (["labels=[-1,3]"], "labels=[-1, 3]: -1 is not a class of the run"),
    (["labels=[a,b]"], "labels=['a', 'b']: 'a' is not a whole number"),
    (["labels=[1.5]"], "labels=[1.5]: 1.5 is not a whole number"),
    (["labels=3"], "labels=3 is not a list"),
    (["prompts=[a red circle]"], "prompts: the run's conditioner reads no captions"),
    (["guidance_rescale=2"], "guidance.rescale=2 must be in [0, 1]"),
    (["guidance_interval=[0.9,0.1]"], "guidance.interval_t=[0.9, 0.1]: give [t_lo, t_hi]"),
    # the guidance group (conf/guidance): scales, intervals, and the runs it names
    (["guidance.scale=-2"], "guidance.scale=-2 must be at least 0"),
    (["guidance=auto", "guidance.weak_checkpoint={tensor}", "guidance.scale=-1"],
     "guidance.scale=-1 must be at least 0"),
    (["guidance=classifier", "guidance.classifier_run={digits_classifier}", "guidance.cfg_scale=-1"],
     "guidance.cfg_scale=-1 must be at least 0"),
    (["guidance.interval=[5,0.3]"], "guidance.interval=[5, 0.3]: give [sigma_lo, sigma_hi] with sigma_lo < sigma_hi"),
    (["guidance.interval=[-1,3]"], "guidance.interval=-1 must be at least 0"),
    (["run={edm_run}", "guidance.interval=[100,200]"], "guidance.interval=[100, 200]: none of the 25 sampler steps' "
                                                        "noise levels sigma/alpha (0.002 to 80) is in (100, 200]"),
    (["run={edm_run}", "guidance.interval=[0,0.001]"], "(0.002 to 80) is in (0, 0.001]; nothing would be guided"),
    (["guidance.interval_t=[0.01,0.03]", "steps=10"], "none of the 10 sampler steps' times (0.1 to 1) is in it"),
    (["guidance.interval_t=[0.5,1.5]"], "guidance.interval_t=1.5 must be in [0, 1]"),
    (["guidance.interval=[0.3,5]", "guidance.interval_t=[0.1,0.9]"], "give one, in noise level sigma/alpha"),
    (["guidance=auto"], "guidance.weak_checkpoint=last is the checkpoint the run samples with (checkpoint=last)"),
    (["guidance=auto", "guidance.weak_run={small_run}"], "was trained with data.image_size=16, this run with "
                                                        "data.image_size=32: other latents"),
    (["guidance=auto", "guidance.weak_run={edm_run}"], "was trained with schedule._target_=ldm.schedules.EDM"),
    (["guidance=auto", "guidance.weak_run={uncond_run}"], "its model reads the conditions [] with 10 classes, this "
                                                         "run's ['label'] with 10"),
    (["guidance=auto", "guidance.weak_run={digits_classifier}"], "is a task=classifier run; give the weaker"),
    (["guidance=auto", "guidance.weak_run={empty_dir}"], "config.yaml not found: give a training run directory"),
    (["guidance=auto", "guidance.weak_checkpoint={missing}"], "guidance.weak_checkpoint={missing}: no such file"),
    (["guidance=classifier"], "guidance=classifier needs guidance.classifier_run=DIR"),
    (["guidance=classifier", "guidance.classifier_run={class_run}"], "is a task=diffusion run; give a python train.py"),
    (["guidance=classifier", "guidance.classifier_run={shapes_classifier}"],
     "was trained with data.channels=3, this run with data.channels=1: another data set"),
    (["run={uncond_run}", "guidance=classifier", "guidance.classifier_run={digits_classifier}"],
     "guidance=classifier steers towards class labels, but the run's conditioner reads nothing"),
    (["batch_size=0"], "batch_size=0 must be at least 1"),
    (["checkpoint={missing}"], "missing.ckpt: no such file"),
    (["run={text_run}", "prompts_file={missing}"], "missing.ckpt: no such file; give a text file"),
]


@pytest.mark.parametrize("arguments,message", SAMPLING, ids=[" ".join(a) for a, _ in SAMPLING])
def test_sampling_argument_mistake_gives_one_message(arguments, message, files, no_model):
    run = [] if any(a.startswith("run=") for a in arguments) else [f"run={files['class_run']}"]
    cfg = compose_config(filled(run + arguments, files), name="sample")
    with pytest.raises(ConfigError) as caught:
        check_sampling(cfg)
    errors = caught.value.errors
    assert len(errors) == 1, errors
    assert message.format(**files) in errors[0], errors[0]


@pytest.mark.parametrize("arguments,message", [
    ([], "run: missing; give the training run directory"),
    (["run={empty_dir}"], "config.yaml not found: run= must be a training run directory"),
], ids=["run unset", "not a run"])
def test_sampling_needs_a_run(arguments, message, files, no_model):
    with pytest.raises(ConfigError) as caught:
        check_sampling(compose_config(filled(arguments, files), name="sample"))
    [error] = caught.value.errors
    assert message in error


def test_every_mistake_is_reported_together(files):
    cfg = compose_config(["model.depth=0", "optimizer.lr=-1", "trainer.max_steps=0", "+model.depht=2"])
    with pytest.raises(ConfigError) as caught:
        check_training(cfg)
    assert [line.split("=")[0].split(":")[0] for line in caught.value.errors] == [
        "model.depht", "model.depth", "optimizer.lr", "trainer.max_steps"]


GOOD = [[], ["model=unet"], ["schedule=edm"], ["schedule=ddpm"], ["experiment=digits_pixel"],
        ["experiment=shapes_text"], ["experiment=vae_digits"], ["experiment=vae_shapes"], ["debug=fdr"],
        ["debug=limit"], ["debug=overfit"], ["lr_scheduler=warmup_cosine"], ["conditioner=none"],
        ["data=folder", "root={images}", "autoencoder=kl_shapes", "conditioner=clip_text_tiny"],
        TINY + ["trainer.max_steps=60", "trainer.val_check_interval=20", "resume=null"]]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(o) or "defaults" for o in GOOD])
def test_shipped_configs_pass(overrides, files, no_model):
    check_training(compose_config(filled(overrides, files)))


def test_a_run_directory_may_continue_with_a_longer_run_only(tmp_path):
    made = compose_config(TINY + ["trainer.max_steps=60"], tmp_path)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(made, tmp_path / ".hydra" / "config.yaml")
    longer = compose_config(TINY + ["trainer.max_steps=600", "trainer.max_time=00:01:00:00"], tmp_path)
    assert run_dir_problems(longer, tmp_path) == []
    [problem] = run_dir_problems(compose_config(TINY + ["trainer.max_steps=600", "model.depth=3"], tmp_path), tmp_path)
    assert problem.startswith(f"model.depth=3 differs from the run in {tmp_path} (made with model.depth=2)")


def test_a_run_directory_from_an_older_version_continues(tmp_path):
    """Keys the project added since, and literals now written as interpolations giving the same value."""
    made = compose_config(TINY + ["trainer.max_steps=60"], tmp_path)
    stored = OmegaConf.to_container(made, resolve=False)
    del stored["model"]["time_frequency_shift"]          # a setting the older version did not have
    shift = made.diffusion.shift_factor
    stored["diffusion"]["shift_factor"] = shift          # the older version wrote the number itself
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(stored), tmp_path / ".hydra" / "config.yaml")
    assert run_dir_problems(compose_config(TINY + ["trainer.max_steps=600", "model.compile=true"], tmp_path),
                            tmp_path) == []
    stored["diffusion"]["shift_factor"] = shift + 0.5    # a real difference is still refused
    OmegaConf.save(OmegaConf.create(stored), tmp_path / ".hydra" / "config.yaml")
    [problem] = run_dir_problems(compose_config(TINY + ["trainer.max_steps=600"], tmp_path), tmp_path)
    assert problem.startswith("diffusion.shift_factor=")


# ---- through the real commands: exit status 2, no traceback, nothing left behind ------------------


def run_command(script: str, *arguments: str, cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LDM_DEBUG")}
    env.update(PYTHONPATH=str(ROOT), LDM_ROOT=str(cwd), WANDB_MODE="offline", **({"LDM_DEBUG": "1"} if debug else {}))
    return run(script, *arguments, cwd=cwd, env=env, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]


def assert_nothing_written(place: Path, before: set[Path]) -> None:
    after = set(place.rglob("*"))
    assert after == before, sorted(map(str, after - before))


CLI_TRAINING = [
    (["model.depth=0"], "model.depth=0 must be at least 1"),
    (["data=folder", "root={images}", "conditioner=clip_text_tiny"], "digits_vae encodes 1-channel images"),
    (["data=shapes", "autoencoder=kl_shapes", "conditioner=class"], "the conditioner reads each item's 'label'"),
    (["resume={empty}"], "empty.ckpt: the file is empty"),
    (["diffusion.warmup_steps=-5"], "diffusion.warmup_steps is now lr_scheduler.warmup_steps"),
    # ranges declared per constructor argument (ldm/checks/ranges.py), and no NaN or inf anywhere
    (["optimizer.lr=inf"], "optimizer.lr=inf is not a finite number"),
    (["optimizer.weight_decay=nan"], "optimizer.weight_decay=nan is not a finite number"),
    (["callbacks.ema.decay=nan"], "callbacks.ema.decay=nan is not a finite number"),
    (["++trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 must be at least 1"),
    (["sampler=euler_ancestral", "sampler.eta=1.5"], "sampler.eta=1.5 must be in [0, 1]"),
]


@pytest.mark.parametrize("overrides,message", CLI_TRAINING, ids=[" ".join(o) for o, _ in CLI_TRAINING])
def test_train_command_refuses_without_traceback_or_leftovers(overrides, message, files, tmp_path):
    before = set(tmp_path.rglob("*"))
    result = run_command("train.py", f"hydra.run.dir={tmp_path / 'run'}", *filled(overrides, files), cwd=tmp_path)
    assert_refused(result, message.format(**files))
    assert_nothing_written(tmp_path, before)  # no run directory, no .cache, no wandb


def test_sweep_with_one_bad_job_starts_none(files, tmp_path):
    before = set(tmp_path.rglob("*"))
    result = run_command("train.py", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "model.depth=2,0", "debug=fdr",
                         cwd=tmp_path)
    assert_refused(result, "job 1 (model.depth=0 debug=fdr): model.depth=0 must be at least 1")
    assert_nothing_written(tmp_path, before)


def test_a_finished_run_is_not_overwritten_by_another_config(files, tmp_path):
    run = tmp_path / "finished"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_bytes((files["class_run"] / ".hydra" / "config.yaml").read_bytes())
    stored = (run / ".hydra" / "config.yaml").read_bytes()
    before = set(tmp_path.rglob("*"))
    # a short run if it were not refused (the keys that may change on resume make it one step long)
    result = run_command("train.py", f"hydra.run.dir={run}", *TINY, "model.depth=3", "trainer.max_steps=1",
                         "trainer.val_check_interval=1", "logger=none", cwd=tmp_path)
    assert_refused(result, "model.depth=3 differs from the run in")
    assert (run / ".hydra" / "config.yaml").read_bytes() == stored
    assert_nothing_written(tmp_path, before)


def test_sample_command_refuses_a_prompt_string(files, tmp_path):
    result = run_command("sample.py", f"run={files['text_run']}", "prompts=a small red circle", cwd=tmp_path)
    assert_refused(result, "prompts='a small red circle' is one string")
    assert not (tmp_path / "samples.npz").exists()


@pytest.mark.parametrize("script", ["sample.py", "evaluate.py"])
def test_guidance_that_is_not_a_number_is_refused_before_sampling(script, files, tmp_path):
    before = set(tmp_path.rglob("*"))
    result = run_command(script, f"run={files['class_run']}", "guidance=nan", cwd=tmp_path)
    assert_refused(result, "guidance.scale=nan is not a finite number")
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("script", ["sample.py", "evaluate.py"])
def test_an_unknown_guidance_is_refused_before_hydra(script, files, tmp_path):
    """guidance=G is a kind (conf/guidance) or a number (the classifier-free scale); anything else: one line."""
    before = set(tmp_path.rglob("*"))
    result = run_command(script, f"run={files['class_run']}", "guidance=classifer", cwd=tmp_path)
    assert_refused(result, "guidance=classifer: no such guidance; choose one of auto, cfg, classifier")
    assert_nothing_written(tmp_path, before)


def test_debugging_keeps_the_traceback(files, tmp_path):
    result = run_command("sample.py", f"run={files['class_run']}", "steps=0", cwd=tmp_path, debug=True)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "steps=0 must be at least 1" in result.stderr
