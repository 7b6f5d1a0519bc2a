"""The wiring of each part, checked against an independent computation: the loss against the flow formula, the
learning rates against torch's schedulers, the EMA against a hand-computed average, weight decay by what an
AdamW step does, the class table's null row, the data order and the cache key. Each test takes seconds."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import hydra
import pytest
import torch
from conftest import TINY, compose_config
from torch import nn

from ldm.callbacks.ema import EMA
from ldm.conditioners import Conditioner
from ldm.conditioners.class_embedder import ClassEmbedder
from ldm.data.cache import cache_fingerprint, data_identity
from ldm.data.datamodule import DataModule
from ldm.data.order import EpochShuffle
from ldm.run.build import build_diffusion
from ldm.tasks.optim import constant, parameter_groups, warmup_cosine

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the training loss ------------------------------------------------------------------------------------


def _pixel_module(tmp_path, overrides=()):
    cfg = compose_config(TINY + ["logger=none", "autoencoder=identity", "model.patch_size=4", *overrides], tmp_path)
    torch.manual_seed(0)
    module = build_diffusion(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    module.measure_latent_stats(datamodule.train_dataloader())
    with torch.no_grad():  # off the zero-initialized output layer, so that predictions depend on the input
        for p in module.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module, datamodule


def test_training_loss_is_the_weighted_flow_mse_on_scaled_pixels(tmp_path, monkeypatch):
    """Rectified flow on pixels: x_t = (1 - t) z0 + t n, target n - z0, z0 = (x - shift) * scale, loss the mean of
    w(t) * mse; with t, n and w chosen here, every quantity is known without the module's code."""
    import ldm.tasks.diffusion as diffusion

    module, datamodule = _pixel_module(tmp_path)
    module.train()
    batch = next(iter(datamodule.train_dataloader()))
    images = batch["image"]
    n = images.shape[0]
    t = torch.linspace(0.05, 0.95, n)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(module.schedule, "sample_t", lambda size, generator=None: t.clone())
    monkeypatch.setattr(module.schedule, "loss_weight", lambda times: 1.0 + 10.0 * times)
    monkeypatch.setattr(diffusion, "randn", lambda shape, generator=None, device=None: noise.clone())
    seen = {}
    forward = module.denoiser.forward

    def spy(x, time, cond):
        seen["x"], seen["t"] = x.detach().clone(), time.detach().clone()
        seen["pred"] = forward(x, time, cond).detach()
        return seen["pred"]

    monkeypatch.setattr(module.denoiser, "forward", spy)
    module.log = lambda *a, **k: None
    loss = module.training_step(batch, 0).item()

    scale = module.schedule.data_std / (images - module.latent_shift).std()  # measured on a sample of the data
    assert module.latent_scale.item() == pytest.approx(scale.item(), rel=0.05)
    z0 = (images - module.latent_shift) * module.latent_scale
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x"], (1 - tb) * z0 + tb * noise, atol=1e-5, rtol=1e-5)
    per_sample = (seen["pred"] - (noise - z0)).pow(2).flatten(1).mean(1)
    assert loss == pytest.approx(((1.0 + 10.0 * t) * per_sample).mean().item(), rel=1e-5)


def test_decode_inverts_a_measured_shift_and_scale(tmp_path):
    module, datamodule = _pixel_module(tmp_path, ["diffusion.shift_factor=null"])
    images = next(iter(datamodule.val_dataloader()))["image"][:16]
    z = module.latents({"image": images}, sample=False)
    assert module.latent_shift.abs().item() > 0.05  # digits are mostly background: a visible mean to remove
    assert z.mean().item() == pytest.approx(0.0, abs=0.15)
    assert z.std().item() == pytest.approx(module.schedule.data_std, rel=0.1)  # scaled after the shift is removed
    torch.testing.assert_close(module.decode(z), images.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_training_step_drops_the_class_for_a_tenth_of_the_rows(tmp_path, monkeypatch):
    """What the denoiser sees in training: each row its own class's vector, or the null class's at drop_rate."""
    module, datamodule = _pixel_module(tmp_path)
    module.train()
    table = module.conditioner.embedders[0].embedding.weight.detach()
    null_row = table[module.conditioner.embedders[0].num_classes]
    dropped = kept = 0
    seen = []
    monkeypatch.setattr(module, "diffusion_loss", lambda z0, noise, t, cond: seen.append(cond.vector) or z0.sum())
    module.log = lambda *a, **k: None
    loader = iter(datamodule.train_dataloader())
    for step in range(40):
        batch = next(loader)
        module.training_step(batch, step)
        vector = seen[-1].detach()
        is_null = (vector == null_row).all(1)
        torch.testing.assert_close(vector[~is_null], table[batch["label"][~is_null]])
        dropped, kept = dropped + int(is_null.sum()), kept + int((~is_null).sum())
    assert dropped / (dropped + kept) == pytest.approx(0.1, abs=0.03)  # conf/conditioner/class.yaml


def test_loading_a_checkpoint_takes_its_ema_or_its_raw_weights(tmp_path):
    from ldm.utils.checkpoint import EMA_KEY

    module, _ = _pixel_module(tmp_path)
    checkpoint = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
    module.on_save_checkpoint(checkpoint)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("autoencoder.")]
    raw = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    checkpoint[EMA_KEY] = {n: v + 1.0 for n, v in raw.items()}
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        module.latent_scale.fill_(7.0)
    for ema, offset in ((True, 1.0), (False, 0.0)):
        module.load_checkpoint(checkpoint, ema=ema)
        params = dict(module.named_parameters())
        for name, value in raw.items():
            torch.testing.assert_close(params[name].detach(), value + offset, msg=f"{name} (ema={ema})")
    assert module.latent_scale.item() == pytest.approx(checkpoint["state_dict"]["latent_scale"].item())


# ---- the conditioner --------------------------------------------------------------------------------------


def test_the_null_class_is_the_row_after_the_last_class():
    embedder = ClassEmbedder(num_classes=10, embed_dim=8)
    table = embedder.embedding.weight.detach()
    assert table.shape == (11, 8)  # DiT's layout: num_classes + 1 rows, the null class last
    torch.testing.assert_close(embedder.null(3, "cpu")["vector"], table[10].expand(3, 8))
    torch.testing.assert_close(embedder(torch.arange(10))["vector"], table[:10])
    with pytest.raises(ValueError, match="labels must be in"):
        embedder(torch.tensor([10]))  # the null row is not a class


def test_class_dropout_rate_eval_and_force_drop():
    torch.manual_seed(0)
    conditioner = Conditioner([ClassEmbedder(num_classes=10, embed_dim=8, drop_rate=0.3)], vector_dim=8).train()
    table = conditioner.embedders[0].embedding.weight.detach()
    labels = torch.randint(0, 10, (4000,))
    with torch.no_grad():
        out = conditioner({"label": labels}, generator=torch.Generator().manual_seed(0)).vector
        is_null = (out == table[10]).all(1)
        assert is_null.float().mean().item() == pytest.approx(0.3, abs=0.025)
        torch.testing.assert_close(out[~is_null], table[labels[~is_null]])
        assert (conditioner({"label": labels}, force_drop=True).vector == table[10]).all()
        conditioner.eval()  # validation and sampling: never dropped
        torch.testing.assert_close(conditioner({"label": labels}).vector, table[labels])
        assert (conditioner({"label": labels}, force_drop=True).vector == table[10]).all()


# ---- EMA ------------------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trained = nn.Linear(3, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def _ema_run(ema: EMA, net: nn.Module, steps, accumulate: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    """Move the weights as optimizer steps would and call the hook as Lightning does; the weights after each step."""
    weights = {}
    for step in steps:
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        weights[step] = {n: p.detach().clone() for n, p in net.named_parameters()}
        for _ in range(accumulate):  # the hook runs once per batch; global_step moves once per optimizer step
            ema.on_train_batch_end(SimpleNamespace(global_step=step), net, None, None, 0)
    return weights


def _hand_ema(weights, decay, start, every):
    average = None
    for step in sorted(weights):
        if step < start or step % every:
            continue
        w = weights[step]["trained.weight"]
        average = w.clone() if average is None else decay * average + (1 - decay) * w
    return average


@pytest.mark.parametrize("decay,start,every", [(0.9, 0, 1), (0.75, 4, 1), (0.5, 3, 2)])
def test_ema_is_the_hand_computed_average_of_the_trained_weights(decay, start, every):
    net, ema = _Net(), EMA(decay=decay, update_starting_at_step=start, update_every_n_steps=every)
    weights = _ema_run(ema, net, range(1, 11), accumulate=2)
    assert set(ema.average) == {"trained.weight", "trained.bias"}  # frozen weights never change: not averaged
    torch.testing.assert_close(ema.average["trained.weight"], _hand_ema(weights, decay, start, every))


def test_ema_before_its_start_is_absent_and_validation_swaps_it_in_and_out():
    net, ema = _Net(), EMA(decay=0.5, update_starting_at_step=5)
    _ema_run(ema, net, range(1, 5))
    assert ema.average is None
    weights = _ema_run(ema, net, range(5, 8))
    raw = {n: p.detach().clone() for n, p in net.named_parameters()}
    ema.on_validation_start(None, net)
    torch.testing.assert_close(net.trained.weight.detach(), _hand_ema(weights, 0.5, 5, 1))
    torch.testing.assert_close(net.frozen.weight.detach(), raw["frozen.weight"])
    ema.on_validation_end(None, net)
    for name, p in net.named_parameters():  # training goes on from the raw weights, bit for bit
        assert torch.equal(p.detach(), raw[name]), name


def test_ema_saved_and_loaded_continues_as_if_uninterrupted():
    net, ema = _Net(), EMA(decay=0.8, update_starting_at_step=2)
    weights = _ema_run(ema, net, range(1, 6))
    checkpoint = {"global_step": 5}
    ema.on_save_checkpoint(None, net, checkpoint)
    resumed = EMA(decay=0.8, update_starting_at_step=2)
    resumed.on_load_checkpoint(None, net, copy.deepcopy(checkpoint))
    weights.update(_ema_run(resumed, net, range(6, 9)))
    torch.testing.assert_close(resumed.average["trained.weight"], _hand_ema(weights, 0.8, 2, 1))


# ---- optimizer and learning rates -------------------------------------------------------------------------


def _lrs(make_scheduler, steps: int, lr: float = 2.0) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_cosine_is_torchs_linear_warmup_then_cosine_annealing():
    warmup, total, final, lr = 5, 20, 0.1, 2.0
    ours = _lrs(lambda o: warmup_cosine(o, warmup_steps=warmup, total_steps=total, final_ratio=final), total + 4, lr)
    # warmup: lr (step + 1) / warmup, from lr / warmup at the first step to lr at step warmup - 1
    linear = _lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1 / warmup, 1.0, total_iters=warmup - 1),
                  warmup, lr)
    cosine = _lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total - warmup, eta_min=final * lr),
                  total - warmup + 1, lr)
    expected = linear + cosine + [final * lr] * 3
    assert ours == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_constant_is_torchs_linear_warmup_then_the_optimizers_lr():
    ours = _lrs(lambda o: constant(o, warmup_steps=4), 10)
    linear = _lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1 / 4, 1.0, total_iters=3), 10)
    assert ours == pytest.approx(linear, rel=1e-6)
    assert _lrs(lambda o: constant(o), 3) == [2.0, 2.0, 2.0]


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.RMSNorm)


@pytest.mark.parametrize("model", ["dit", "unet"])
def test_an_adamw_step_decays_layer_weights_only(model, tmp_path):
    """With zero gradients an AdamW step only decays: layer weights shrink by lr * weight_decay, while biases,
    norms, embedding tables (the null class too) and position tables stay where they are."""
    overrides = [o for o in TINY if model == "dit" or not o.startswith("model.depth")]
    cfg = compose_config(overrides + [f"model={model}", "optimizer.weight_decay=0.1", "optimizer.lr=0.01"], tmp_path)
    module = build_diffusion(cfg)
    perturb_params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in perturb_params.values():
            p.add_(0.1)
    before = {n: p.detach().clone() for n, p in perturb_params.items()}
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    for p in perturb_params.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    owner = {f"{m_name}.{p_name}".lstrip("."): m for m_name, m in module.named_modules()
             for p_name, _ in m.named_parameters(recurse=False)}
    decayed_kinds = (nn.Linear, nn.Conv2d)
    shrunk = 0
    for name, p in perturb_params.items():
        layer = owner[name]
        if isinstance(layer, decayed_kinds) and name.endswith(".weight"):
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.01 * 0.1), msg=name)
            shrunk += 1
        else:
            assert isinstance(layer, (*NORMS, nn.Embedding, *decayed_kinds)) or p.ndim < 2 or "pos" in name, name
            assert torch.equal(p.detach(), before[name]), f"{name} ({type(layer).__name__}) was decayed"
    assert shrunk > 0
    assert any(n.endswith(".bias") for n in perturb_params)
    assert model == "dit" or any(isinstance(owner[n], NORMS) for n in perturb_params)  # DiT's norms have no weights


def test_parameter_groups_leave_out_frozen_parameters():
    net = _Net()
    grouped = [p for g in parameter_groups(net) for p in g["params"]]
    assert {id(p) for p in grouped} == {id(net.trained.weight), id(net.trained.bias)}


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_the_trainers_clipping_hook_clips_as_torch_does_under_bf16(algorithm):
    """Lightning calls `configure_gradient_clipping` with the config's value and algorithm; under bf16 with the fused
    AdamW the result must be torch's clip_grad_norm_ / clip_grad_value_."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from ldm.tasks.optim import FusedClipping

    class Clipped(FusedClipping, nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 8)
            self.trainer = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"))

    module = Clipped()
    grads = [10 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
             for i, p in enumerate(module.parameters())]
    for parameter, grad in zip(module.parameters(), grads, strict=True):
        parameter.grad = grad.clone()
    expected = [g.clone().requires_grad_() for g in grads]  # torch clips .grad of these stand-ins
    for stand_in, grad in zip(expected, grads, strict=True):
        stand_in.grad = grad.clone()
    clip = torch.nn.utils.clip_grad_norm_ if algorithm == "norm" else torch.nn.utils.clip_grad_value_
    clip(expected, 0.5)
    module.configure_gradient_clipping(torch.optim.AdamW(module.parameters(), fused=True), 0.5, algorithm)
    for parameter, stand_in in zip(module.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, stand_in.grad)


# ---- data order -----------------------------------------------------------------------------------------


def _epoch(order: EpochShuffle, epoch: int) -> list[int]:
    order.set_epoch(epoch)
    return list(order)


def test_each_epoch_is_a_new_permutation_that_follows_the_seed():
    a, b, other_seed = EpochShuffle(50, seed=3), EpochShuffle(50, seed=3), EpochShuffle(50, seed=4)
    epochs = [_epoch(a, e) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(50))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert [_epoch(b, e) for e in (2, 0, 1)] == [epochs[2], epochs[0], epochs[1]]  # a function of (seed, epoch)
    assert _epoch(other_seed, 0) != epochs[0]


def test_ranks_share_each_global_batch_and_see_every_item_once():
    size, batch, world = 103, 4, 3
    single = _epoch(EpochShuffle(size, seed=1, batch_size=batch * world), 2)
    ranks = [_epoch(EpochShuffle(size, seed=1, batch_size=batch, rank=r, world_size=world), 2) for r in range(world)]
    assert len(single) == size // (batch * world) * batch * world
    for g in range(len(single) // (batch * world)):  # global batch g: rank r takes the r-th block of it
        together = [i for r in range(world) for i in ranks[r][g * batch:(g + 1) * batch]]
        assert together == single[g * batch * world:(g + 1) * batch * world]
    assert len({i for r in ranks for i in r}) == sum(len(r) for r in ranks)


def test_resume_mid_epoch_continues_the_permutation_and_the_next_epoch_is_whole():
    order = EpochShuffle(40, seed=7, batch_size=4)
    full, following = _epoch(order, 1), _epoch(order, 2)
    resumed = EpochShuffle(40, seed=7, batch_size=4)
    resumed.resume_at(1, 12)
    assert list(resumed) == full[12:]
    assert _epoch(resumed, 2) == following
    # the data module hands its resume position to every loader it makes: in a later epoch it must not cut it
    reloaded = EpochShuffle(40, seed=7, batch_size=4)
    reloaded.resume_at(1, 12)
    assert _epoch(reloaded, 2) == following


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.zeros(1, 2, 2), "index": i}


def _datamodule(seed: int, batch: int = 4, rank: int = 0, world: int = 1, epoch: int = 0, processed: int = 0):
    datamodule = DataModule(_Indexed(48), _Indexed(8), image_size=2, channels=1, batch_size=batch)
    datamodule.shuffle_seed = seed
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch,
                                         accumulate_grad_batches=1,
                                         fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    return datamodule


def _indices(datamodule) -> list[int]:
    return [int(i) for b in datamodule.train_dataloader() for i in b["index"]]


def test_the_run_seed_picks_the_data_order():
    orders = [_indices(_datamodule(seed)) for seed in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == list(range(48))


def test_a_run_stopped_on_two_ranks_resumes_on_one_with_the_rest_of_the_epoch():
    uninterrupted = _indices(_datamodule(seed=5, batch=8))  # one process, global batch 8
    stopped = _datamodule(seed=5, batch=4, world=2, processed=3)  # 3 steps of 2 x 4 items
    state = stopped.state_dict()
    resumed = _datamodule(seed=5, batch=8)
    resumed.load_state_dict(state)
    assert _indices(resumed) == uninterrupted[24:]
    seen = [i for r in range(2) for b in list(_datamodule(seed=5, batch=4, rank=r, world=2).train_dataloader())[:3]
            for i in b["index"].tolist()]
    assert sorted(seen) == sorted(uninterrupted[:24])


# ---- the cache key --------------------------------------------------------------------------------------


def test_the_cache_key_follows_what_the_data_is_not_how_it_is_loaded():
    from ldm.autoencoders.identity import IdentityAutoencoder

    def key(overrides, split="train"):
        cfg = compose_config(["data=digits", *overrides])
        return cache_fingerprint(data_identity(cfg.data), split, _Indexed(4), IdentityAutoencoder(1), {})

    base = key([])
    assert key(["data.batch_size=7", "data.num_workers=3", "+data.val_batch_size=5"]) == base
    assert key(["data.cache_dir=/elsewhere"]) == base
    assert key([], split="val") != base
    for change in ("data.image_size=16", "data=shapes"):
        assert key([change]) != base, change


# ---- a short real run: what it logs and saves ---------------------------------------------------------------


def test_a_run_logs_torchs_learning_rates_saves_the_hand_computed_ema_and_trains_on_raw_weights(tmp_path):
    """12 steps, validation at 6 and 12: the logged learning rate of every parameter group is torch's linear warmup
    then cosine annealing, ema_state_dict is the EMA of the weights after each step from step 4, and each step
    starts from the weights the previous one left, validation (run with the EMA) in between."""
    import csv

    from conftest import train_run
    from probes import RecordSteps

    from ldm.utils.checkpoint import load_checkpoint

    warmup, total, lr, final, decay, start = 3, 12, 1e-3, 0.2, 0.8, 4
    train_run(TINY + ["logger=csv", "callbacks.sample_grid=null", "callbacks.sample_metrics=null",
                      f"trainer.max_steps={total}", "trainer.val_check_interval=6", "trainer.log_every_n_steps=1",
                      "+data.val_batch_size=100", "lr_scheduler=warmup_cosine", f"lr_scheduler.warmup_steps={warmup}",
                      f"lr_scheduler.final_ratio={final}", f"optimizer.lr={lr}", f"callbacks.ema.decay={decay}",
                      f"callbacks.ema.update_starting_at_step={start}", "optimizer.weight_decay=0.01",
                      "+callbacks.record._target_=probes.RecordSteps"], tmp_path)

    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    columns = sorted(k for k in rows[0] if k.startswith("lr-"))
    assert len(columns) == 2, columns  # the decayed and the undecayed group
    linear = _lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1 / warmup, 1.0, total_iters=warmup - 1), warmup, lr)
    cosine = _lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total - warmup, eta_min=final * lr),
                  total - warmup, lr)
    for column in columns:
        logged = {int(r["step"]): float(r[column]) for r in rows if r.get(column)}
        assert [logged.get(s) for s in range(total)] == pytest.approx(linear + cosine, rel=1e-5), column

    after, before = RecordSteps.after, RecordSteps.before
    assert sorted(after) == list(range(1, total + 1)) and sorted(before) == list(range(total))
    for step in range(1, total):
        for name, value in after[step].items():
            assert torch.equal(before[step][name], value), f"step {step + 1} did not start from step {step}'s {name}"
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == total
    for name, value in checkpoint["ema_state_dict"].items():
        average = after[start][name].clone()
        for step in range(start + 1, total + 1):
            average = decay * average + (1 - decay) * after[step][name]
        torch.testing.assert_close(value, average, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(checkpoint["state_dict"][name], after[total][name], rtol=0, atol=0, msg=name)
