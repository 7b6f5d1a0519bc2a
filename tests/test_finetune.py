"""Fine-tuning a finished run: a LoRA run stores its adapters only and refuses another base, sample.py rebuilds base
and adapters (or puts a LoRA run on its base), its export loads in diffusers; a partial run trains its targets only;
bad fine-tune settings get one clear message before any work."""

from __future__ import annotations

import shutil

import hydra
import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, train_run
from diffusers import DiTTransformer2DModel
from omegaconf import OmegaConf
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ldm.checks.sampling import check_sampling
from ldm.checks.training import check_training
from ldm.commands.export import export
from ldm.commands.sample import sample
from ldm.contracts.conditioning import Conditioning
from ldm.finetune import LoRA
from ldm.run.init_from import initial_weights
from ldm.run.load import build_run, read_run_config
from ldm.utils.checkpoint import EMA_KEY, CheckpointError, load_checkpoint
from ldm.utils.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

# the shared trained_run's settings (conftest.TINY), so that its weights fit
RUN = TINY + ["logger=csv", "callbacks.sample_grid=null", "callbacks.sample_metrics=null",
              "callbacks.noise_levels=null", "+trainer.limit_val_batches=1", "trainer.max_steps=4",
              "trainer.val_check_interval=2"]


@pytest.fixture(scope="module")
def lora_run(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    train_run(RUN + ["finetune=lora", f"init_from={trained_run}"], out)
    return out


def shaken(run, tmp_path, scale: float = 0.1):
    """A copy of a run whose adapters (raw and EMA) are moved off their start, where peft's zero up projections
    would hide a wrong key or scale."""
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    path = copy / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    for state in (checkpoint["state_dict"], checkpoint[EMA_KEY]):
        for key, value in state.items():
            if "lora_" in key:
                value.add_(scale * torch.randn(value.shape, generator=generator))
    torch.save(checkpoint, path)
    return copy


def test_a_lora_checkpoint_holds_the_adapters_and_the_rebuilt_run_its_base(lora_run, trained_run):
    checkpoint = load_checkpoint(lora_run / "checkpoints" / "last.ckpt")
    adapters = sorted(key for key in checkpoint["state_dict"] if ".lora_" in key)
    assert adapters and set(checkpoint["state_dict"]) - set(adapters) == {
        "latent_scale", "latent_shift", "latent_stats_ready"}
    assert sorted(checkpoint[EMA_KEY]) == adapters  # the EMA covers the adapters only
    [optimizer] = checkpoint["optimizer_states"]
    assert len(optimizer["state"]) == len(adapters)
    assert {"base.denoiser", "base.conditioner"} <= set(checkpoint["frozen_parts"])
    base_size = (trained_run / "checkpoints" / "last.ckpt").stat().st_size
    size = (lora_run / "checkpoints" / "last.ckpt").stat().st_size
    print(f"LoRA checkpoint {size / 1e3:.0f} kB, the base run's {base_size / 1e3:.0f} kB")
    assert size < base_size / 4

    module = build_run(read_run_config(lora_run), lora_run, "last", "cpu")
    base, _ = initial_weights(trained_run)  # the base run's EMA weights
    state = module.state_dict()
    for key, value in base.items():
        if key.startswith(("denoiser.", "conditioner.")):
            wrapped = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(state[key if key in state else wrapped], value), key
    for key, value in checkpoint[EMA_KEY].items():
        assert torch.equal(state[key], value), key


def _sample(tmp_path, name: str, *arguments: str) -> np.ndarray:
    out = tmp_path / f"{name}.npz"
    sample(compose_config([*arguments, "n=4", "steps=2", f"out={out}", "device=cpu"], name="sample"))
    return np.load(out)["images"]


def test_sample_rebuilds_a_lora_run_or_puts_it_on_its_base(lora_run, trained_run, tmp_path):
    shaken_run = shaken(lora_run, tmp_path)
    own = _sample(tmp_path, "own", f"run={shaken_run}")
    on_base = _sample(tmp_path, "on_base", f"run={trained_run}", f"lora=[{shaken_run}]")
    base = _sample(tmp_path, "base", f"run={trained_run}")
    off = _sample(tmp_path, "off", f"run={trained_run}", f"lora=[{shaken_run}]", "lora_scale=[0]")
    assert np.array_equal(own, on_base) and np.array_equal(base, off)
    assert not np.array_equal(own, base)


def test_a_base_that_changed_is_refused(lora_run, trained_run, tmp_path):
    other = tmp_path / "other_base"
    shutil.copytree(trained_run, other)
    checkpoint = torch.load(other / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint[EMA_KEY]["denoiser.blocks.0.mlp.net.2.weight"] += 1e-3
    torch.save(checkpoint, other / "checkpoints" / "last.ckpt")
    moved = tmp_path / "lora"
    shutil.copytree(lora_run, moved)
    config = OmegaConf.load(moved / ".hydra" / "config.yaml")
    config.init_from = str(other)
    OmegaConf.save(config, moved / ".hydra" / "config.yaml")
    with pytest.raises(CheckpointError, match="frozen part 'base.denoiser' differs from the one this checkpoint was "
                                              r"trained with .*check the base the run fine-tuned"):
        build_run(read_run_config(moved), moved, "last", "cpu")
    with pytest.raises(CheckpointError, match=rf"lora={lora_run} was trained on another base than this model's: "
                                              "'base.denoiser'"):
        _sample(tmp_path, "other", f"run={other}", f"lora=[{lora_run}]")


def test_a_partial_run_trains_its_targets_only(trained_run, tmp_path):
    train_run(RUN + ["finetune=partial", "finetune.targets=[adaln]", f"init_from={trained_run}"], tmp_path)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    trained = {key for key in checkpoint["state_dict"] if not key.startswith("latent_")}
    assert trained and all("adaLN_modulation.proj" in key for key in trained)
    base, _ = initial_weights(trained_run)
    module = build_run(read_run_config(tmp_path), tmp_path, "last", "cpu")
    moved = {key for key, value in module.state_dict().items() if key in base and not torch.equal(value, base[key])}
    assert moved == trained


def test_the_exported_lora_and_merged_network_compute_the_runs_output_in_diffusers(lora_run, trained_run, tmp_path):
    run = shaken(lora_run, tmp_path)
    export(str(trained_run), out=str(tmp_path / "base"))
    path = export(str(run), out=str(tmp_path / "lora"))
    merged = export(str(run), out=str(tmp_path / "merged"), merge=True)
    state = load_file(path)
    assert path.name == "pytorch_lora_weights.safetensors" and all(key.startswith("transformer.") for key in state)

    # diffusers' DiT has no LoRA loader: the file goes in through peft, as diffusers' loaders do
    reference = DiTTransformer2DModel.from_pretrained(tmp_path / "base" / "transformer").eval()
    layers = sorted({key.removeprefix("transformer.").split(".lora_")[0] for key in state})
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=layers), reference)
    result = set_peft_model_state_dict(reference, {key.removeprefix("transformer."): value
                                                   for key, value in state.items()})
    assert not result.unexpected_keys
    merged_model = DiTTransformer2DModel.from_pretrained(merged).eval()

    module = build_run(read_run_config(run), run, "last", "cpu")
    table = module.conditioner.embedders[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    t, labels = torch.tensor([1.0, 0.7, 0.3, 0.05]), torch.tensor([0, 4, 9, table.num_classes])
    with torch.no_grad():
        x_in, t_in = module.schedule.model_input(x, t)
        ours = module.denoiser(x_in, t_in, Conditioning(vector=table.embedding(labels)))
        for name, network in (("LoRA file", reference), ("merged", merged_model)):
            theirs = network(x_in, timestep=t_in * 1000, class_labels=labels).sample
            difference = ((theirs - ours).abs().max() / ours.abs().max()).item()
            print(f"exported {name} in diffusers: largest relative difference {difference:.2e}")
            assert difference <= 1e-4


@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_peft_s_other_adapters_train_on_the_dit(adapter):
    cfg = compose_config(TINY)
    denoiser = hydra.utils.instantiate(cfg.model)
    LoRA(adapter=adapter, rank=2, alpha=2.0).apply(denoiser)
    trainable = [name for name, parameter in denoiser.named_parameters() if parameter.requires_grad]
    prefix = {"loha": ".hada_", "lokr": ".lokr_"}[adapter]  # peft's names of their factors
    assert trainable and all(prefix in name for name in trainable)
    out = denoiser(torch.randn(2, 4, 8, 8), torch.rand(2), Conditioning(vector=torch.randn(2, cfg.model.vector_dim)))
    out.square().mean().backward()
    assert all(parameter.grad is not None for parameter in denoiser.parameters() if parameter.requires_grad)


@pytest.mark.parametrize("overrides,message", [
    (["finetune=lora", "finetune.rank=0"], "finetune.rank=0 must be at least 1"),
    (["finetune=lora", "finetune.targets=[attn.to_qkvv]"],
     "finetune.targets: 'attn.to_qkvv' matches no module that an adapter can wrap (Linear, Conv2d) of the DiT; the "
     "closest module names are blocks.0.attn.to_qkv"),
    (["finetune=partial", "finetune.targets=[convs]"], "finetune.targets: 'convs' matches no module of the DiT"),
    (["finetune=lora", "finetune.adapter=loha", "finetune.use_dora=true"], "finetune.use_dora=true with "
                                                                          "finetune.adapter=loha"),
], ids=["rank", "lora targets", "partial targets", "dora"])
def test_bad_fine_tune_settings_give_one_message(overrides, message, trained_run):
    with pytest.raises(ConfigError) as caught:
        check_training(compose_config(RUN + overrides + [f"init_from={trained_run}"]))
    [error] = caught.value.errors
    assert message in error


def test_a_fine_tune_without_a_base_or_from_a_lora_run_is_refused(lora_run):
    with pytest.raises(ConfigError) as caught:
        check_training(compose_config(RUN + ["finetune=lora"]))
    assert caught.value.errors == ["finetune=lora fine-tunes a base, and there is none: give model.weights=FILE "
                                   "(published weights) or init_from=RUN_DIR (a finished run), or train every weight "
                                   "from scratch with finetune=full"]
    with pytest.raises(ConfigError) as caught:
        check_training(compose_config(RUN + ["trainer.max_steps=6", f"init_from={lora_run}"]))
    [error] = caught.value.errors
    assert f"init_from={lora_run} is a finetune=lora run, whose checkpoints hold only what it trained" in error


def test_bad_lora_sources_at_sampling_give_one_message(lora_run, trained_run, tmp_path):
    unet_lora = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32, 1, 1),
                 "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4, 1, 1)}
    save_file(unet_lora, tmp_path / "unet.safetensors")
    for arguments, message in [
        ([f"lora=[{tmp_path / 'unet.safetensors'}]"],
         "does not fit this DiT: its key down_blocks.0.attentions.0.proj_in.lora_A.weight names no layer"),
        ([f"lora=[{lora_run}]", "lora_scale=[1,2]"], "lora_scale=[1, 2] has 2 weights for 1 LoRAs"),
        ([f"lora=[{trained_run}]"], "is a run directory, but not of a finetune=lora run"),
        ([f"lora=[{tmp_path / 'none.safetensors'}]"], "none.safetensors: no such file or directory"),
    ]:
        with pytest.raises(ConfigError) as caught:
            check_sampling(compose_config([f"run={trained_run}", *arguments], name="sample"))
        [error] = caught.value.errors
        assert message in error, error
