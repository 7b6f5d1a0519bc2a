"""LoRA files users exchange, against diffusers on random tiny SD-1-like UNets: a diffusers / peft LoRA loads into
model=unet_sd with diffusers' output; the project's exported LoRA loads in diffusers with the project's output; a
kohya file merges into the weights diffusers' loader merges; several LoRAs with scales add up as diffusers'
set_adapters makes them; a file of another architecture is refused naming its first key that does not fit."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from test_pretrained_unet import SD1, SD2, TOLERANCE, build, inputs, reference, relative_difference

from ldm.contracts.conditioning import Conditioning
from ldm.finetune import LoRA
from ldm.finetune.adapters import activate, merge_adapters
from ldm.finetune.files import export_lora, import_lora
from ldm.weights.files import WeightsError
from ldm.weights.lora import DIFFUSERS_FILE
from ldm.weights.unet import DIFFUSERS, key_map, to_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")

# every kind of layer a LoRA of SD reaches: attention projections, feed-forward, 1x1 projections, resnet convs
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def with_lora(unet: UNet2DConditionModel, name: str, targets=TARGETS, rank: int = 4, alpha: float = 6.0):
    """A peft LoRA added through diffusers, its up projections random (peft starts them at zero)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    unet.add_adapter(config, adapter_name=name)
    return config


def save_diffusers_lora(unet: UNet2DConditionModel, name: str, config: LoraConfig, directory) -> None:
    """As diffusers' training scripts save it: peft's state dict, and the LoRA config as the file's metadata."""
    layers = get_peft_model_state_dict(unet, adapter_name=name)
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=config.to_dict())


@torch.no_grad()
def outputs(ours, theirs: UNet2DConditionModel) -> tuple[torch.Tensor, torch.Tensor]:
    x, levels, context = inputs()
    return (ours(x, levels.float(), Conditioning(tokens=context)),
            theirs(x, levels, encoder_hidden_states=context).sample)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random SD-1-like diffusers UNet saved as a model directory."""
    directory = tmp_path_factory.mktemp("base")
    reference(SD1).save_pretrained(directory / "unet")
    return directory / "unet"


def test_a_diffusers_lora_loads_with_diffusers_output(base, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(base).eval()
    config = with_lora(unet, "style")
    save_diffusers_lora(unet, "style", config, tmp_path / "lora")
    model = build("sd1", base)
    import_lora(model, tmp_path / "lora", "lora_0")
    activate(model, {"lora_0": 1.0})
    ours, theirs = outputs(model, unet)
    unet.disable_adapters()
    _, plain = outputs(model, unet)
    assert relative_difference(plain, theirs) > 0.1  # the LoRA changes the output a lot
    difference = relative_difference(ours, theirs)
    print(f"diffusers LoRA (alpha/rank 1.5, in the file's metadata) here: largest relative difference {difference:.2e}")
    assert difference <= TOLERANCE


@pytest.mark.parametrize("dora", [False, True])
def test_the_exported_lora_loads_in_diffusers_with_the_projects_output(dora, tmp_path):
    model = perturb(build("sd1"))
    to_diffusers(model, tmp_path / "base")
    LoRA(rank=4, alpha=6.0, targets=["attention", "mlp", "convs"], use_dora=dora).apply(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the adapters off their start (peft's up projections are zero)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    path = export_lora(model, tmp_path / "lora")
    assert path.name == DIFFUSERS_FILE and all(key.startswith("unet.") for key in load_file(path))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "base").eval()
    unet.load_lora_adapter(str(path), prefix="unet", adapter_name="exported")
    difference = relative_difference(*outputs(model, unet))
    print(f"exported {'DoRA' if dora else 'LoRA'} in diffusers: largest relative difference {difference:.2e}")
    assert difference <= TOLERANCE


def kohya(diffusers_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """kohya's names for a diffusers LoRA: the module path with underscores, lora_down / lora_up, and alpha."""
    out = {}
    for key, value in diffusers_state.items():
        path, _, tail = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + path.replace(".", "_")
        out[f"{name}.lora_{'down' if tail == 'A.weight' else 'up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def test_a_kohya_file_merges_into_the_weights_diffusers_merges(base, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(base).eval()
    with_lora(unet, "style", alpha=3.0)
    layers = get_peft_model_state_dict(unet, adapter_name="style")
    save_file(kohya({f"unet.{key}": value for key, value in layers.items()}, alpha=3.0), tmp_path / "kohya.safetensors")

    theirs = UNet2DConditionModel.from_pretrained(base).eval()
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "kohya.safetensors"))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=theirs, adapter_name="kohya")
    theirs.fuse_lora()
    merged = {key.replace(".base_layer", ""): value for key, value in theirs.state_dict().items() if "lora_" not in key}

    model = build("sd1", base)
    import_lora(model, tmp_path / "kohya.safetensors", "lora_0")
    activate(model, {"lora_0": 1.0})
    merge_adapters(model)
    own = model.state_dict()
    for ours, sources in key_map(model, DIFFUSERS).items():
        for source, part in zip(sources, own[ours].chunk(len(sources)), strict=True):
            assert relative_difference(part, merged[source]) <= 1e-5, source
    before = {key.replace(".base_layer", ""): value for key, value in unet.state_dict().items() if "lora_" not in key}
    assert sum(not torch.equal(merged[key], before[key]) for key in merged) > 50  # the LoRA moved what is compared
    # and with the same output, unmerged, as diffusers' own LoRA
    assert relative_difference(*outputs(model, theirs)) <= TOLERANCE


def test_several_loras_with_scales_add_up_as_diffusers_set_adapters(base, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(base).eval()
    first = with_lora(unet, "first", targets=["to_q", "to_k", "to_v", "to_out.0"], rank=2, alpha=4.0)
    second = with_lora(unet, "second", targets=["to_k", "ff.net.0.proj", "ff.net.2", "conv1"], rank=3, alpha=3.0)
    save_diffusers_lora(unet, "first", first, tmp_path / "first")
    save_diffusers_lora(unet, "second", second, tmp_path / "second")
    unet.set_adapters(["first", "second"], weights=[0.7, -0.4])

    model = build("sd1", base)
    import_lora(model, tmp_path / "first", "lora_0")
    import_lora(model, tmp_path / "second", "lora_1")
    activate(model, {"lora_0": 0.7, "lora_1": -0.4})
    difference = relative_difference(*outputs(model, unet))
    print(f"two LoRAs at 0.7 and -0.4: largest relative difference to diffusers {difference:.2e}")
    assert difference <= TOLERANCE
    activate(model, {"lora_0": 0.7, "lora_1": 0.4})  # a scale that reaches the network
    assert relative_difference(*outputs(model, unet)) > 10 * TOLERANCE


def test_a_lora_of_another_architecture_is_refused_naming_the_first_key(tmp_path):
    unet = reference(SD2, seed=3)
    config = with_lora(unet, "sd2")
    save_diffusers_lora(unet, "sd2", config, tmp_path / "sd2")
    model = build("sd1")
    with pytest.raises(WeightsError, match=r"does not fit this UNet: its key down_blocks\.0\.attentions\.0\.proj_in"
                                           r"\.lora_A\.weight has down \(4, 32\)"):
        import_lora(model, tmp_path / "sd2", "lora_0")
    state = load_file(tmp_path / "sd2" / DIFFUSERS_FILE)
    save_file({key.replace("down_blocks.0.", "down_blocks.00."): value for key, value in state.items()},
              tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match=r"its key down_blocks\.00\.attentions\.0\.proj_in\.lora_A\.weight names no "
                                           "layer of it"):
        import_lora(model, tmp_path / "other.safetensors", "lora_0")
