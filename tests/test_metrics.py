"""Metrics against closed forms, scipy and numpy references; the shipped feature networks, the reference
cache and the suite (the published backends: tests/test_feature_backends.py)."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from ldm.metrics.attributes import AttributeAccuracy
from ldm.metrics.clip_score import ClipScore
from ldm.metrics.frechet import compute_with_reference, frechet_metric
from ldm.metrics.kid import kernel_distance
from ldm.metrics.precision_recall import knn_radii, manifold_metrics
from ldm.metrics.reference import compute_reference
from ldm.metrics.suite import MetricSuite, build_suite


def frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = frechet_metric(real.shape[1])
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def with_exact_moments(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> torch.Tensor:
    """n samples whose sample mean and (n - 1)-normalized covariance are exactly `mean` and `cov`."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: sample covariance I
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mean)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_frechet_distance_of_exact_statistics_is_the_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    # Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), the symmetric form
    root = psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(root @ s2 @ root))
    measured = frechet(with_exact_moments(300, mu1, s1, 1), with_exact_moments(200, mu2, s2, 2))
    assert measured == pytest.approx(expected, rel=1e-8)
    # commuting (diagonal) covariances: sum of (sqrt(s1) - sqrt(s2))^2
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    diagonal = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    measured = frechet(with_exact_moments(300, mu1, np.diag(v1), 3), with_exact_moments(300, mu2, np.diag(v2), 4))
    assert measured == pytest.approx(diagonal, rel=1e-8)


def test_frechet_distance_matches_scipy_sqrtm_and_is_zero_for_a_set_with_itself():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(400, 32, generator=generator, dtype=torch.float64)
    fake = torch.randn(300, 32, generator=generator, dtype=torch.float64) * 1.3 + 0.2
    mu1, mu2 = real.mean(0).numpy(), fake.mean(0).numpy()
    s1, s2 = np.cov(real.numpy(), rowvar=False), np.cov(fake.numpy(), rowvar=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet(real, fake) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet(real, real)) < 1e-9 * np.trace(s1)
    # the same distance from reference statistics (mean, cov, count) as from the real features themselves
    metric = frechet_metric(32)
    metric.update(fake, real=False)
    reference = compute_with_reference(metric, torch.from_numpy(mu1), torch.from_numpy(s1), len(real))
    assert float(reference) == pytest.approx(expected, rel=1e-9)


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimate with k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_kid_is_the_unbiased_mmd_estimate():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(120, 16, generator=generator, dtype=torch.float64)
    fake = torch.randn(120, 16, generator=generator, dtype=torch.float64) + 0.3
    full = unbiased_mmd2(real.numpy(), fake.numpy())
    # a subset of every sample is a permutation of the sets: the estimate itself
    mean, std, size = kernel_distance(real, fake, subsets=3, subset_size=1000)
    assert size == 120 and mean == pytest.approx(full, rel=1e-9) and std < 1e-9 * abs(full)
    # over random subsets its expectation is the full-sample estimate
    mean, std, size = kernel_distance(real, fake, subsets=400, subset_size=40, seed=1)
    assert size == 40 and abs(mean - full) < 4 * std / np.sqrt(400)
    # two samples of one distribution: zero in expectation, far below the shifted pair
    same = torch.randn(120, 16, generator=generator, dtype=torch.float64)
    mean_same, std_same, _ = kernel_distance(real, same, subsets=400, subset_size=40, seed=1)
    assert abs(mean_same) < 4 * std_same / np.sqrt(400) + abs(unbiased_mmd2(real.numpy(), same.numpy()))
    assert abs(mean_same) < 0.1 * full


def manifold_reference(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The four definitions, one sample at a time."""
    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])  # [0] is the point itself

    r_real, r_fake = radii(real), radii(fake)
    inside = np.array([[np.linalg.norm(f - r) <= rr for r, rr in zip(real, r_real, strict=True)]
                       for f in fake])  # (N, M)
    recalled = [any(np.linalg.norm(r - f) <= rf for f, rf in zip(fake, r_fake, strict=True)) for r in real]
    return {"precision": inside.any(axis=1).mean(), "recall": np.mean(recalled),
            "density": inside.sum(axis=1).mean() / k, "coverage": inside.any(axis=0).mean()}


def test_precision_recall_density_coverage():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(200, 5, generator=generator)
    ones = {"precision": 1.0, "recall": 1.0, "coverage": 1.0}
    assert {k: v for k, v in manifold_metrics(real, real.clone()).items() if k != "density"} == ones
    far = manifold_metrics(real, real + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # against the definitions, on overlapping clouds, in small chunks
    fake = torch.randn(150, 5, generator=generator) * 1.2 + 0.5
    measured = manifold_metrics(real, fake, k=3, chunk=64)
    expected = manifold_reference(real.double().numpy(), fake.double().numpy(), 3)
    assert measured == pytest.approx(expected, abs=1e-12)
    # by hand: real points 0..9 on a line (k=3 radii: 3 at the ends, 2 elsewhere); half the fakes copy
    # 0..4, half sit far away -> precision 1/2; every fake at 4.5 lies in the balls of 3, 4, 5 and 6
    line = torch.arange(10.0)[:, None]
    half = manifold_metrics(line, torch.cat([torch.arange(5.0), torch.arange(100.0, 105.0)])[:, None])
    # recall: real 0..7 lie in a fake ball (fake 4's radius is 3, and 7 is on its boundary), 8 and 9 do not
    assert half["precision"] == 0.5 and half["recall"] == 0.8
    assert torch.equal(knn_radii(line), torch.tensor([3.0] + [2.0] * 8 + [3.0], dtype=torch.float64))
    # on the boundary counts as inside: -3 and 12 lie on the balls of 0 and 9 (radius 3), -3.01 and 20 do not
    edge = manifold_metrics(line, torch.tensor([[-3.0], [-3.01], [12.0], [20.0]]))
    assert edge["precision"] == 0.5 and edge["coverage"] == 0.2
    point = manifold_metrics(line, torch.full((4, 1), 4.5))
    assert point["density"] == pytest.approx(4 / 3) and point["coverage"] == 0.4 and point["precision"] == 1.0


def test_clip_score_is_100_times_the_clipped_cosine_averaged():
    angles = torch.tensor([0.0, 60.0, 90.0, 120.0]) * torch.pi / 180
    image = torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros(4)], dim=1) * 3.0  # scale is ignored
    text = torch.tensor([[1.0, 0.0, 0.0]]).expand(4, -1)
    metric = ClipScore()
    metric.update(image[:2], text[:2])
    metric.update(image[2:], text[2:])
    assert float(metric.compute()) == pytest.approx(100 * (1.0 + 0.5 + 0.0 + 0.0) / 4)


def test_attribute_accuracy_skips_what_was_not_asked():
    metric = AttributeAccuracy(["color", "shape"])
    logits = {"color": F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float(),
              "shape": F.one_hot(torch.tensor([1, 1, 0, 0]), 2).float()}
    metric.update(logits, {"color": torch.tensor([0, 1, 0, -1]), "shape": torch.tensor([1, 0, -1, 0])})
    scores = metric.compute()
    assert float(scores["color"]) == pytest.approx(2 / 3) and float(scores["shape"]) == pytest.approx(2 / 3)
    assert float(scores["all"]) == pytest.approx(2 / 4)  # samples 0 and 3


# ---- the shipped feature networks, the reference cache, the suite ----

def degraded(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Real images with visible noise, and visibly blurred (sigma 2 pixels): what a metric must tell from real ones;
    and blurred by 1 pixel, which on the digits (upsampled from 8x8) is hard to see."""
    from torchvision.transforms.v2.functional import gaussian_blur

    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    return {"noise": (images + noise).clamp(-1, 1), "blur": gaussian_blur(images, [9, 9], [2.0, 2.0]),
            "slight_blur": gaussian_blur(images, [5, 5], [1.0, 1.0])}


def features_of(backend, images: torch.Tensor) -> torch.Tensor:
    from ldm.metrics.features import unit_images

    with torch.no_grad():
        return torch.cat([backend(unit_images(chunk)) for chunk in images.split(500)]).double()


def test_shipped_digits_network_tells_real_digits_from_degraded_ones():
    from ldm.data.digits import DigitsDataset

    suite = build_suite("digits", metrics=["fd", "accuracy"])
    train, val = DigitsDataset("train"), DigitsDataset("val")
    reference = features_of(suite.backend, train.images)
    distances = {"val": frechet(reference, features_of(suite.backend, val.images))}
    distances |= {name: frechet(reference, features_of(suite.backend, images))
                  for name, images in degraded(val.images).items()}
    # dropping modes: validation digits 0-4 only, against as many validation digits of every class
    few = val.labels < 5
    distances["classes_0_4"] = frechet(reference, features_of(suite.backend, val.images[few]))
    distances["val_same_count"] = frechet(reference, features_of(suite.backend, val.images[: int(few.sum())]))
    print(f"fd_digits against the training digits: {distances}")
    assert distances["val"] < 0.1 * min(distances["noise"], distances["blur"])
    assert distances["val"] < distances["slight_blur"] and distances["classes_0_4"] > 2 * distances["val_same_count"]
    suite.update(train.images, real=True)
    suite.update(val.images, real=False, labels=val.labels)
    scores = suite.compute()
    assert scores["fd_digits"] == pytest.approx(distances["val"], rel=1e-6) and scores["accuracy_digits"] > 0.97


def test_shipped_shapes_network_tells_real_shapes_from_degraded_ones_and_reads_captions():
    from ldm.data.shapes import ShapesDataset

    suite = build_suite("shapes", metrics=["fd", "accuracy"])
    train, val = ShapesDataset("train", num_samples=1500), ShapesDataset("val", num_samples=500)
    train_images = torch.stack([train[i]["image"] for i in range(len(train))])
    val_images = torch.stack([val[i]["image"] for i in range(len(val))])
    reference = features_of(suite.backend, train_images)
    distances = {"val": frechet(reference, features_of(suite.backend, val_images))}
    distances |= {name: frechet(reference, features_of(suite.backend, images))
                  for name, images in degraded(val_images).items()}
    print(f"fd_shapes against the training shapes: {distances}")
    assert distances["val"] < 0.1 * min(distances["noise"], distances["blur"])
    assert distances["val"] < distances["slight_blur"]
    suite.update(train_images, real=True)
    suite.update(val_images, real=False, captions=[val.caption(i) for i in range(len(val))])
    scores = suite.compute()
    print(f"shapes prompt following of real validation shapes: {scores}")
    assert all(scores[f"accuracy_shapes_{name}"] > 0.95 for name in ("shape", "color", "position", "size"))


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images, self.reads = images, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        return {"image": self.images[i]}


def test_reference_statistics_are_cached_and_score_like_the_real_images(tmp_path):
    import hashlib

    from ldm.data.digits import DigitsDataset

    settings = dict(backend="digits", metrics=["fd", "kid", "precision_recall", "density_coverage"],
                    kid_subsets=20, kid_subset_size=100, cache_dir=str(tmp_path))
    real, fake = DigitsDataset("val").images, DigitsDataset("train").images[:200]
    direct = build_suite(**settings)
    for chunk in real.split(128):
        direct.update(chunk, real=True)
    direct.update(fake, real=False)
    cached = build_suite(**settings)
    dataset = CountingDataset(real)
    reference = cached.load_reference(dataset, "val", {"name": "digits"})
    reads = dataset.reads
    again = cached.load_reference(dataset, "val", {"name": "digits"})
    assert reads >= len(real) and dataset.reads - reads <= 1  # read from disk (one item for the image shape)
    assert torch.equal(again.cov, reference.cov) and again.key == reference.key and again.count == len(real)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [
        f"reference-digits-val-{reference.key}.safetensors"]
    assert reference.cov.dtype == torch.float64
    # other weights, another data split or another resolution: another key
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ldm.metrics.project_features import ProjectFeatures
    from ldm.metrics.reference import reference_key

    with safe_open(str(cached.backend.weights_path), framework="pt") as file:
        tensors, metadata = {key: file.get_tensor(key) for key in file.keys()}, file.metadata()
    tensors["heads.label.bias"] = tensors["heads.label.bias"] + 1.0
    save_file(tensors, tmp_path.parent / "other.safetensors", metadata=metadata)
    other = ProjectFeatures("digits", tmp_path.parent / "other.safetensors")
    keys = {reference_key(other, {"name": "digits"}, "val", dataset, 10_000, 0),
            reference_key(cached.backend, {"name": "digits"}, "train", dataset, 10_000, 0),
            reference_key(cached.backend, {"name": "digits"}, "val", CountingDataset(real[:, :, :16, :16]), 10_000, 0)}
    assert reference.key not in keys and len(keys) == 3
    assert torch.allclose(reference.mean, features_of(cached.backend, real).mean(0), rtol=1e-6, atol=1e-9)
    cached.set_reference(again)
    cached.update(fake[:120], real=False)
    cached.update(fake[120:], real=False)
    expected, measured = direct.compute(), cached.compute()
    assert measured.keys() == expected.keys() == {"fd_digits", "kid_digits", "kid_digits_std", "precision_digits",
                                                  "recall_digits", "density_digits", "coverage_digits"}
    assert measured == pytest.approx(expected, rel=1e-7)
    record = cached.provenance()
    sha = hashlib.sha256(cached.backend.weights_path.read_bytes()).hexdigest()
    assert record["weights_sha256"] == sha and record["backend"] == "digits" and not record["published"]
    assert (record["num_real"], record["num_fake"], record["reference"]) == (300, 200, reference.key)
    with pytest.raises(Exception, match="reference"):
        cached.update(real[:4], real=True)
    cached.reset()
    cached.update(fake[:50], real=False)
    assert cached.compute()["fd_digits"] != measured["fd_digits"] and cached.provenance()["num_fake"] == 50


def _ddp_worker(rank: int, world: int, init_file: str, settings: dict, results) -> None:
    from ldm.data.digits import DigitsDataset

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        suite = build_suite(**settings)
        suite.set_reference(compute_reference(suite.backend, DigitsDataset("val")))
        train = DigitsDataset("train")
        share = slice(0, 130) if rank == 0 else slice(130, 200)  # uneven shares, in order
        suite.update(train.images[share], real=False, labels=train.labels[share])
        results.put((rank, suite.compute(), suite.provenance()["num_fake"]))
    finally:
        torch.distributed.destroy_process_group()


def test_suite_under_ddp_gives_every_rank_the_single_process_numbers(tmp_path):
    from ldm.data.digits import DigitsDataset

    settings = dict(backend="digits", metrics=["fd", "kid", "precision_recall", "density_coverage", "accuracy"],
                    kid_subsets=20, kid_subset_size=100)
    single = build_suite(**settings)
    single.set_reference(compute_reference(single.backend, DigitsDataset("val")))
    train = DigitsDataset("train")
    single.update(train.images[:200], real=False, labels=train.labels[:200])
    expected = single.compute()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_ddp_worker, args=(rank, 2, str(tmp_path / "init"), settings, results))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    for rank, scores, num_fake in outcomes:
        assert num_fake == 200, f"rank {rank} saw {num_fake} samples"
        assert scores == pytest.approx(expected, rel=1e-7), f"rank {rank}"


def test_metrics_config_group(tmp_path):
    import hydra
    from conftest import CONF, compose_config

    from ldm.checks.keys import config_errors
    from ldm.utils.errors import ConfigError

    options = sorted(path.stem for path in (CONF / "metrics").glob("*.yaml"))
    assert {"digits", "shapes", "inception", "dinov2", "clip"} <= set(options)
    for option in options:
        cfg = compose_config([f"+metrics={option}"], tmp_path)
        assert config_errors(cfg) == [], option
        if cfg.metrics.backend in ("digits", "shapes"):
            suite = hydra.utils.instantiate(cfg.metrics)
            assert isinstance(suite, MetricSuite) and suite.backend.name == cfg.metrics.backend
        else:  # the published networks need their files
            with pytest.raises(Exception, match=f"metrics.weights.{cfg.metrics.backend}="):
                hydra.utils.instantiate(cfg.metrics)
    with pytest.raises(ConfigError, match="unknown metric 'fid'.*choose from"):
        build_suite("digits", metrics=["fid"])
    with pytest.raises(ConfigError, match="clip_score.*metrics.backend=clip"):
        build_suite("digits", metrics=["clip_score"])
    with pytest.raises(ConfigError, match="metrics.backend=mnist"):
        build_suite("mnist")


@pytest.mark.slow
def test_feature_network_training_is_deterministic():
    from ldm.tools.train_features import train

    first, record = train("digits", epochs=1, log=lambda line: None)
    second, _ = train("digits", epochs=1, log=lambda line: None)
    second_state = second.state_dict()
    assert all(torch.equal(value, second_state[key]) for key, value in first.state_dict().items())
    assert record["epochs"] == 1
