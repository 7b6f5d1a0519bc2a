"""A run made with the defaults (class-conditional digits, latent DiT, flow schedule) leaves the project:
`export` writes its denoiser as a diffusers DiTTransformer2DModel that computes what the run computes, with
the time convention in config.json; a class-conditional UNet is refused, naming why."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, compose_config, train_run
from diffusers import DiTTransformer2DModel

from ldm.checks.training import check_training
from ldm.commands.export import export, main
from ldm.contracts.conditioning import Conditioning
from ldm.run.build import build_diffusion
from ldm.run.load import build_run, read_run_config
from ldm.utils.checkpoint import EMA_KEY
from ldm.utils.errors import ConfigError
from ldm.weights.files import WeightsError

pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = [*TINY, "logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "callbacks.sample_grid=null", "callbacks.sample_metrics=null", "model.hidden_size=64"]


def shake(run) -> None:
    """Move the run's denoiser and class table off their start: after two steps the zero-initialized adaLN and
    output layers still hide most of the network (a wrong class row or time would pass unseen)."""
    path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    for state in (checkpoint["state_dict"], checkpoint.get(EMA_KEY) or {}):
        for key, value in state.items():
            if key.startswith(("denoiser.", "conditioner.")) and value.is_floating_point():
                value.add_(0.1 * torch.randn(value.shape, generator=generator))
    torch.save(checkpoint, path)


def test_default_dit_run_exports_to_diffusers(tmp_path, capsys):
    run = tmp_path / "run"
    train_run(SHORT, run)
    shake(run)
    main([f"run={run}", f"out={tmp_path / 'out'}"])
    assert "timestep = 1000 * schedule.model_input" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert config["_ldm_time_scale"] == 1000.0 and "at t=0.5: 500" in config["_ldm_timestep"]
    exported = DiTTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer").eval()

    module = build_run(read_run_config(run), run, "last", "cpu")
    table = module.conditioner.embedders[0]
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(6, 4, 8, 8, generator=generator)
    t = torch.tensor([1.0, 0.9, 0.5, 0.31, 0.05, 0.0])
    labels = torch.tensor([0, 3, 9, table.num_classes, 7, table.num_classes])  # num_classes: the null class
    with torch.no_grad():
        x_in, t_in = module.schedule.model_input(x_t, t)
        ours = module.denoiser(x_in, t_in, Conditioning(vector=table.embedding(labels)))
        theirs = exported(x_in, timestep=t_in * config["_ldm_time_scale"], class_labels=labels).sample
    difference = ((theirs - ours).abs().max() / ours.abs().max()).item()
    print(f"default DiT run -> diffusers: largest relative difference {difference:.2e}")
    assert difference <= 1e-4

    # and back: the export loads as model.weights, under the time convention it records
    reload = [*SHORT, "conditioner=imagenet", f"conditioner.embedders.0.num_classes={table.num_classes}",
              "conditioner.embedders.0.class_names=null", f"model.weights={tmp_path / 'out'}"]
    back = compose_config(reload)
    check_training(back)
    with pytest.raises(ConfigError, match="model.time_scale=1000"):
        check_training(compose_config([*reload, "model.time_scale=1"]))
    loaded = build_diffusion(back).eval()
    with torch.no_grad():
        again = loaded.denoiser(x_in, t_in, Conditioning(vector=loaded.conditioner.embedders[0].embedding(labels)))
    assert ((again - ours).abs().max() / ours.abs().max()).item() <= 1e-4


def test_class_unet_run_is_refused_naming_why(tmp_path):
    run = tmp_path / "run"
    unet = [item for item in SHORT if not item.startswith("model.")]
    train_run([*unet, "model=unet", "model.channels=32"], run)
    with pytest.raises(WeightsError) as refused:
        export(str(run), out=str(tmp_path / "out"))
    assert "model.context_dim=null: its attention layers are plain self-attention" in str(refused.value)
    assert "model.vector_dim=256: its vector condition" in str(refused.value)
