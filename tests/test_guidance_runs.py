"""Guidance with real runs: `task=classifier` trains the classifier of classifier guidance; the weaker model of
autoguidance and the classifier are loaded from run directories, checked against the run before sampling, and
used by sample.py, evaluate.py (inside Lightning's predict loop) and the training callbacks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import compose_config, train_run

from ldm.guidance import CFG, Auto, Classifier, Guidance
from ldm.run.guidance import resolve_guidance
from ldm.run.load import load_run
from ldm.utils.errors import UserError

# the classifier of the trained_run fixture's data: same data, batch size and seed, so the same latent scale
CLASSIFIER = ["task=classifier", "trainer.accelerator=cpu", "data.batch_size=32", "data.cache=false",
              "lr_scheduler.warmup_steps=0", "logger=csv", "trainer.max_steps=30", "trainer.val_check_interval=30"]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier") / "run"
    train_run(CLASSIFIER, out)
    return out


def test_the_classifier_learns_the_labels_of_noisy_latents(classifier_run):
    """30 steps: well above chance (0.1) on validation latents noised at the schedule's training times; the
    autoencoder is referenced by hash, not stored."""
    [metrics] = classifier_run.glob("csv/*/metrics.csv")
    lines = [line.split(",") for line in metrics.read_text().splitlines()]
    column = lines[0].index("val/accuracy")
    accuracy = [float(row[column]) for row in lines[1:] if row[column]]
    assert accuracy[-1] > 0.3, accuracy
    checkpoint = torch.load(classifier_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(checkpoint["frozen_parts"]) == {"autoencoder"}
    assert not any(key.startswith("autoencoder.") for key in checkpoint["state_dict"])


def test_classifier_guidance_loads_the_classifier_and_shifts_the_prediction(trained_run, classifier_run):
    """The guided prediction is the conditional one with its noise estimate moved by -s sigma grad log p(y|x_t),
    the gradient of the loaded classifier's own log-probability (taken here by finite differences)."""
    _, module = load_run(trained_run)
    guidance = resolve_guidance(Classifier(scale=4.0, classifier_run=str(classifier_run)), module)
    labels = torch.tensor([3, 7])
    x = torch.randn(2, *module.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.4)
    with torch.no_grad():
        guided = guidance.model_fn(module, {"label": labels})(x, t)
        plain = module.predict(x, t, module.conditioner({"label": labels}))
    schedule, log_likelihood = module.schedule, guidance.classifier.log_likelihood(labels)
    _, noise_guided = schedule.to_x0_noise(x, guided, t)
    _, noise_plain = schedule.to_x0_noise(x, plain, t)
    _, sigma = schedule.alpha_sigma(t)
    direction = (noise_plain - noise_guided) / (4.0 * sigma[:, None, None, None])  # the gradient used
    step = 1e-2
    with torch.no_grad():  # a directional derivative of the classifier along the gradient it gave
        unit = direction / direction.flatten(1).norm(dim=1)[:, None, None, None]
        slope = (log_likelihood(x + step * unit, t) - log_likelihood(x - step * unit, t)) / (2 * step)
    torch.testing.assert_close(slope, direction.flatten(1).norm(dim=1), rtol=0.05, atol=1e-4)
    assert (direction.flatten(1).norm(dim=1) > 1e-3).all()


def test_sample_and_evaluate_with_classifier_guidance(trained_run, classifier_run, tmp_path):
    """Through the commands; evaluate.py takes the classifier's gradient inside Lightning's predict loop
    (inference mode). Classifier scale 0 is CFG with cfg_scale (to rounding)."""
    from ldm.commands.evaluate import evaluate
    from ldm.commands.sample import sample

    drawn = {}
    for name, guidance in (("classifier", ["guidance=classifier", "guidance.scale=3"]),
                           ("zero", ["guidance=classifier", "guidance.scale=0", "guidance.cfg_scale=2"]),
                           ("cfg", ["guidance=2"])):
        if name != "cfg":
            guidance = [*guidance, f"guidance.classifier_run={classifier_run}"]
        out = tmp_path / f"{name}.npz"
        sample(compose_config([f"run={trained_run}", "n=4", "steps=3", "labels=[2,5]", f"out={out}", *guidance],
                              name="sample"))
        drawn[name] = np.load(out)["images"].astype(int)
    assert np.abs(drawn["zero"] - drawn["cfg"]).max() <= 1
    assert np.abs(drawn["classifier"] - drawn["cfg"]).max() > 10
    out = tmp_path / "evaluation"
    evaluate(compose_config([f"run={trained_run}", "n=8", "batch_size=4", "steps=2", "metrics=digits",
                             "metrics.kid_subsets=2", "wandb.mode=disabled", f"metrics.cache_dir={tmp_path / 'cache'}",
                             "guidance=classifier", f"guidance.classifier_run={classifier_run}"], out, name="evaluate"))
    provenance = json.loads((out / "metrics.json").read_text())["provenance"]
    assert provenance["guidance_kind"] == "classifier" and provenance["guidance"] == 1.0
    assert provenance["guidance_classifier"].startswith(str(classifier_run.resolve()))


def test_autoguidance_with_an_earlier_checkpoint_of_the_run(trained_run, tmp_path):
    """weak_checkpoint: the run's previous.ckpt (step 40 of 60), loaded with its EMA weights; the guided
    prediction is weak + w (strong - weak) of the two checkpoints, each loaded on its own here."""
    earlier = trained_run / "checkpoints" / "previous.ckpt"
    _, module = load_run(trained_run)
    _, weak = load_run(trained_run, checkpoint=str(earlier))
    guidance = resolve_guidance(Auto(scale=2.5, weak_checkpoint=str(earlier)), module, trained_run)
    assert guidance.sources["guidance_weak"].endswith("step 40")
    labels = {"label": torch.tensor([1, 8])}
    x = torch.randn(2, *module.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 0.6)
    with torch.no_grad():
        strong_pred = module.predict(x, t, module.conditioner(labels))
        weak_pred = weak.predict(x, t, weak.conditioner(labels))
        guided = guidance.model_fn(module, labels)(x, t)
    assert (strong_pred - weak_pred).abs().max() > 1e-3  # an earlier model, not the same one
    torch.testing.assert_close(guided, weak_pred + 2.5 * (strong_pred - weak_pred))
    from ldm.commands.sample import sample

    out = tmp_path / "auto.npz"
    sample(compose_config([f"run={trained_run}", "n=2", "steps=2", f"out={out}", "guidance=auto",
                           f"guidance.weak_checkpoint={earlier}"], name="sample"))
    assert np.load(out)["images"].shape == (2, 32, 32, 1)


def test_a_weaker_model_of_other_latents_is_refused_after_loading(trained_run, tmp_path):
    """Same config, but latents measured to another scale: one line naming the key and the fix, before sampling."""
    weak = tmp_path / "weak"
    shutil.copytree(trained_run / ".hydra", weak / ".hydra")
    checkpoint = torch.load(trained_run / "checkpoints" / "previous.ckpt", weights_only=True)
    checkpoint["state_dict"]["latent_scale"] = checkpoint["state_dict"]["latent_scale"] * 1.1
    (weak / "checkpoints").mkdir()
    torch.save(checkpoint, weak / "checkpoints" / "last.ckpt")
    _, module = load_run(trained_run)
    with pytest.raises(UserError) as caught:
        resolve_guidance(Auto(weak_run=str(weak)), module, trained_run)
    [line] = caught.value.problems
    assert line.startswith(f"guidance.weak_run={weak}: its latent_scale") and "diffusion.scale_factor=" in line


def test_the_training_callbacks_take_the_guidance_group(tmp_path):
    """guidance=... on train.py reaches the sample grid and the sample metrics (conf/callbacks/default.yaml), and
    the grid draws with it."""
    import hydra

    cfg = compose_config(["guidance.scale=3", "guidance.interval=[0.5,5]"], tmp_path)
    grid = hydra.utils.instantiate(cfg.callbacks.sample_grid)
    metrics = hydra.utils.instantiate(cfg.callbacks.sample_metrics)
    assert grid.guidance == metrics.guidance == CFG(scale=3.0, interval=[0.5, 5.0])

    class Module:
        sample_guidance = 2.0

        def sample(self, conditions, n, guidance=None, generator=None):
            self.guidance = guidance
            return torch.zeros(n, 1, 8, 8)

    class Trainer:
        global_step, loggers = 10, []

        class datamodule:  # noqa: N801 - stands in for an attribute
            @staticmethod
            def grid_conditions(per_row):
                return {"label": torch.arange(per_row)}, per_row

    module = Module()
    grid.render(Trainer(), module, "step")
    assert isinstance(module.guidance, Guidance) and module.guidance.scale == 3.0
    interval = module.guidance.interval
    assert (interval.low, interval.high, interval.in_t) == (0.5, 5, False)


@pytest.mark.parametrize("schedule", ["flow", "edm"])
def test_the_classifier_sees_the_runs_noisy_latents(schedule):
    """What the network reads in training: model_input of x_t = alpha z0 + sigma noise under the config's own
    schedule, at times from its own time sampler (log-normal noise levels for EDM), drawn in that order."""
    from ldm.run.build import build_classifier_training
    from ldm.utils.noise import randn

    module = build_classifier_training(compose_config(["task=classifier", f"schedule={schedule}"]))
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            seen.update(x=x, t=t)
            return torch.zeros(len(x), 10, requires_grad=True)

    module.classifier = Recorder()
    batch = {"image": torch.rand(6, 1, 32, 32) * 2 - 1, "label": torch.arange(6)}
    module._losses(batch, torch.Generator().manual_seed(5), sample=False)
    generator = torch.Generator().manual_seed(5)
    z0 = module.latents(batch, sample=False, generator=generator)
    noise = randn(z0.shape, generator=generator)
    t = module.schedule.sample_t(6, generator=generator)
    alpha, sigma = module.schedule.alpha_sigma(t)
    x_in, t_in = module.schedule.model_input(alpha[:, None, None, None] * z0 + sigma[:, None, None, None] * noise, t)
    torch.testing.assert_close(seen["x"], x_in)
    torch.testing.assert_close(seen["t"], t_in)
    assert sigma.min() > 0 and not torch.allclose(seen["x"], module.schedule.model_input(z0, t)[0])
