"""How LatentDiffusion wires its parts: latent scaling, EDM preconditioning on real latents, seeded
draws, full-precision targets, guidance's null condition, condition dropout and weight decay groups."""

from __future__ import annotations

import hydra
import pytest
import torch
from conftest import TINY, compose_config

from ldm.data.cache import data_identity
from ldm.run.build import build_diffusion
from ldm.tasks.optim import DECAYED_LAYERS


def _setup(overrides: list[str], tmp_path):
    cfg = compose_config(TINY + ["logger=none"] + overrides, tmp_path)
    torch.manual_seed(0)
    module = build_diffusion(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data))
    module.measure_latent_stats(datamodule.train_dataloader())
    return module, datamodule


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    return _setup([], tmp_path_factory.mktemp("flow"))


@pytest.fixture(scope="module")
def edm(tmp_path_factory):
    return _setup(["schedule=edm"], tmp_path_factory.mktemp("edm"))


def _training_latents(module, datamodule, batches: int = 6) -> torch.Tensor:
    loader = datamodule.train_dataloader()
    return torch.cat([module.latents(b) for _, b in zip(range(batches), loader, strict=False)])


@pytest.mark.parametrize("setup", ["flow", "edm"])
def test_training_latents_have_the_std_the_schedule_assumes(setup, request):
    module, datamodule = request.getfixturevalue(setup)
    z = _training_latents(module, datamodule)
    assert z.std().item() == pytest.approx(module.schedule.data_std, rel=0.05)


def test_decode_inverts_the_latent_scaling(flow):
    module, datamodule = flow
    images = next(iter(datamodule.val_dataloader()))["image"][:16]
    autoencoder = module.autoencoder
    expected = autoencoder.decode(autoencoder.encode(images, sample=False)).clamp(-1, 1)
    decoded = module.decode(module.latents({"image": images}, sample=False))
    torch.testing.assert_close(decoded, expected, atol=1e-4, rtol=1e-4)


def test_edm_input_and_target_have_unit_std_on_training_latents(edm):
    module, datamodule = edm
    z0 = _training_latents(module, datamodule)
    schedule = module.schedule
    for sigma in (0.02, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0):
        t = schedule.t_of_sigma(torch.full((z0.shape[0],), sigma))
        noise = torch.randn_like(z0)
        x_in, _ = schedule.model_input(schedule.noised(z0, noise, t), t)
        target = schedule.target(z0, noise, t)
        assert x_in.std().item() == pytest.approx(1.0, abs=0.1), f"c_in x_t at sigma {sigma}"
        assert target.std().item() == pytest.approx(1.0, abs=0.1), f"target at sigma {sigma}"


def _logged(module, step):
    values = []
    module.log = lambda name, value, **kwargs: values.append(value.item())
    step()
    return values[-1]


def test_validation_draws_are_fixed(flow):
    module, datamodule = flow
    batch = next(iter(datamodule.val_dataloader()))
    module.eval()
    first = _logged(module, lambda: module.validation_step(batch, 0))
    torch.rand(100)  # the global stream moving must not matter
    assert _logged(module, lambda: module.validation_step(batch, 0)) == first
    assert _logged(module, lambda: module.validation_step(batch, 1)) != first  # each batch index its own draw


def test_training_draws_follow_seed_step_and_batch(flow):
    module, datamodule = flow
    batch = next(iter(datamodule.train_dataloader()))
    module.train()
    first = _logged(module, lambda: module.training_step(batch, 3))
    torch.rand(100)
    assert _logged(module, lambda: module.training_step(batch, 3)) == first
    assert _logged(module, lambda: module.training_step(batch, 4)) != first


def test_latents_and_targets_stay_float32_under_bf16_autocast(flow):
    module, datamodule = flow
    batch = next(iter(datamodule.val_dataloader()))
    denoiser, target = module.denoiser.forward, module.schedule.target
    module.log = lambda *a, **k: None

    def validation_inputs(autocast: bool) -> dict:
        seen = {}

        def spy_denoiser(x, t, cond):
            seen["x_in"], seen["t_in"] = x, t
            return denoiser(x, t, cond)

        def spy_target(*args):
            seen["z0"] = args[0]
            seen["target"] = target(*args)
            return seen["target"]

        module.denoiser.forward, module.schedule.target = spy_denoiser, spy_target
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                module.validation_step(batch, 0)
        finally:
            del module.denoiser.forward
            module.schedule.target = target
        return seen

    full, mixed = validation_inputs(False), validation_inputs(True)
    for name in ("z0", "x_in", "t_in", "target"):
        assert mixed[name].dtype == torch.float32, name
        torch.testing.assert_close(mixed[name], full[name], rtol=1e-6, atol=1e-6, msg=name)


def test_guidance_contrasts_the_condition_with_the_null_condition(flow):
    module, _ = flow
    module.eval()
    with torch.no_grad():  # the zero-initialized output layer would make every prediction equal
        for p in module.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    calls = []
    forward = module.denoiser.forward
    module.denoiser.forward = lambda x, t, cond: calls.append(cond.vector.clone()) or forward(x, t, cond)
    labels = torch.tensor([1, 7, 3])
    try:
        guided = module.sample({"label": labels}, 3, steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0))
    finally:
        del module.denoiser.forward
    conditional = module.conditioner({"label": labels}).vector
    null = module.conditioner({"label": labels}, force_drop=True).vector
    assert len(calls) == 2 and calls[0].shape[0] == 6  # one batched call per step: conditional, then null
    torch.testing.assert_close(calls[0][:3], conditional)
    torch.testing.assert_close(calls[0][3:], null)
    assert not torch.allclose(conditional, null)
    plain = module.sample({"label": labels}, 3, steps=2, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert (guided - plain).abs().max() > 1e-3


def test_class_text_drops_the_whole_condition_a_tenth_of_the_time():
    from omegaconf import OmegaConf

    cfg = compose_config(["conditioner=class_text", "data=digits",
                          "conditioner.embedders.1.pretrained=null", "+conditioner.embedders.1.embed_dim=512",
                          "+conditioner.embedders.1.text_cfg={width: 512, layers: 1, heads: 8, context_length: 8}"])
    conditioner = hydra.utils.instantiate(OmegaConf.to_container(cfg.conditioner, resolve=True)).train()
    n = 4000
    batch = {"label": torch.randint(0, 10, (n,)), "caption": ["a digit"] * n}
    with torch.no_grad():
        out = conditioner(batch, generator=torch.Generator().manual_seed(0)).vector
        null = conditioner(batch, force_drop=True).vector
    class_dropped = (out[:, :256] == null[:, :256]).all(1).float()
    text_dropped = (out[:, 256:] == null[:, 256:]).all(1).float()
    both = (class_dropped * text_dropped).mean().item()
    expected = 0.1 + 0.9 * 0.05 * 0.05  # conditioner.drop_rate, then each part alone
    assert both == pytest.approx(expected, abs=0.015)
    assert class_dropped.mean().item() == pytest.approx(0.1 + 0.9 * 0.05, abs=0.015)


def test_weight_decay_only_on_layer_weights(flow, tmp_path):
    cfg = compose_config(TINY + ["optimizer.weight_decay=0.1"], tmp_path)
    module = build_diffusion(cfg)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    free = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {id(p): n for n, p in module.named_parameters()}
    layer_weights = {id(m.weight) for m in module.modules() if isinstance(m, DECAYED_LAYERS) and m.weight.requires_grad}
    assert decay == layer_weights and decay
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert free == trainable - layer_weights and not decay & free
    no_decay_names = {names[i] for i in free}
    assert "conditioner.embedders.0.embedding.weight" in no_decay_names  # the class table with its null row
    assert any(n.endswith(".bias") for n in no_decay_names)


def test_guided_samples_follow_the_class_better_than_unguided(tmp_path):
    """A short real run: guidance must raise the digits classifier's agreement with the asked class."""
    from conftest import digits_accuracy, train_run

    from ldm.run.load import load_run

    train_run(TINY + ["logger=none", "callbacks.sample_grid=null", "data.batch_size=64", "trainer.max_steps=400",
                      "trainer.val_check_interval=400", "callbacks.ema.decay=0.99", "optimizer.lr=1e-3"], tmp_path)
    _, module = load_run(tmp_path)
    labels = torch.arange(200) % 10
    accuracy = {}
    for scale in (1.0, 3.0):
        images = module.sample({"label": labels}, 200, steps=10, guidance=scale,
                               generator=torch.Generator().manual_seed(0))
        accuracy[scale] = digits_accuracy(images, labels.numpy())
    print(f"digit accuracy by guidance scale: {accuracy}")
    assert accuracy[3.0] > accuracy[1.0] + 0.1, accuracy
