"""The bench's building blocks at tiny sizes: same work on both sides of a pair, the FLOP count, the peak,
the JSON file and --compare. No test here asserts a time."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ldm.tools.bench import peak
from ldm.tools.bench.cli import main
from ldm.tools.bench.denoisers import dit_pair, unet_pair
from ldm.tools.bench.flops import count_flops
from ldm.tools.bench.peak import matmul_peak
from ldm.tools.bench.timing import alternate

CPU = torch.device("cpu")


def _flops(comparison) -> list[int]:
    return [count_flops(member.step) for member in comparison.members]


def test_dit_pair_does_the_same_flops_as_diffusers():
    """A mismatched config (depth, heads, patch, MLP ratio, output channels) would move one side's count.

    Narrow and shallow, so that the output layer weighs enough for learned sigma on one side only to
    show (3% here); diffusers' per-block re-embedding of t and the class is the 0.5% left."""
    ours, theirs = _flops(dit_pair("dit_s", 2, CPU, latent_size=16, hidden_size=32, depth=1, num_heads=2))
    assert ours > 0 and abs(ours / theirs - 1) < 0.015, (ours, theirs)


def test_unet_pair_does_the_same_flops_as_diffusers():
    ours, theirs = _flops(unet_pair(1, CPU, channels=32, latent_size=16))
    assert ours > 0 and abs(ours / theirs - 1) < 0.015, (ours, theirs)


def test_cpu_attention_is_counted_like_explicit_matmuls():
    """torch counts CUDA attention only; the CPU kernel must count as q @ k^T and weights @ v would."""
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    fused = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    explicit = count_flops(lambda: torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v)
    assert fused == explicit == 2 * 2 * 2 * 3 * 16 * 16 * 8


def test_peak_is_positive():
    for precision in ("fp32", "bf16"):
        assert matmul_peak(precision, CPU, size=128, repeats=2) > 0


def test_peak_is_the_fastest_shape_a_square_or_a_transformer_layer(monkeypatch):
    assert peak.peak_shapes(2048) == [(2048, 2048, 2048), (4096, 384, 1536)]
    rates = {(2048, 2048, 2048): 2.3e12, (4096, 384, 1536): 3.3e12}
    monkeypatch.setattr(peak, "shape_flops", lambda m, k, n, precision, device, repeats: rates[(m, k, n)])
    assert matmul_peak("bf16", CPU) == 3.3e12


def test_members_alternate_and_warmup_is_dropped():
    calls = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, steps=3, warmup=2,
                      device=CPU)
    assert calls == ["a", "b"] * 5
    assert [len(times["a"]), len(times["b"])] == [3, 3]


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    main(["--quick", "--only", "sampling", "--precision", "fp32", "--json", str(path)])
    return path


def test_json_has_the_expected_fields(quick_result):
    document = json.loads(quick_result.read_text())
    assert set(document) >= {"meta", "peak_flops", "skipped", "results"}
    assert document["peak_flops"]["fp32"] > 0
    rows = document["results"]
    assert {row["group"] for row in rows} == {"sampling"}
    for row in rows:
        assert set(row) >= {"name", "precision", "batch_size", "project", "reference", "ratio"}
        sides = [side for side in (row["project"], row["reference"]) if side is not None]
        for side in sides:
            assert set(side) >= {"label", "seconds", "images_per_s", "flops", "gflops_per_s", "mfu", "params"}
            assert side["seconds"] > 0 and side["mfu"] > 0
    samplers = [row for row in rows if row["name"].startswith("samplers")]
    assert len(samplers) >= 5  # euler, ancestral, dpmpp_2m, euler_ancestral, heun
    # the same NFE on the same network: every sampler and both guidance calls do the same FLOPs
    assert len({row["project"]["flops"] for row in samplers}) == 1
    guidance = next(row for row in rows if row["name"].startswith("guidance"))
    assert guidance["project"]["flops"] == guidance["reference"]["flops"]


def test_compare_prints_the_change(quick_result, tmp_path, capsys):
    document = json.loads(quick_result.read_text())
    for row in document["results"]:
        row["project"]["seconds"] *= 2
        if row["ratio"] is not None:
            row["ratio"] *= 2
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(document))
    capsys.readouterr()
    main(["--compare", str(quick_result), str(slower)])
    out = capsys.readouterr().out
    rows = len(document["results"])
    assert out.count("+100.0%") == rows + sum(row["ratio"] is not None for row in document["results"])
    assert f"{rows} rows compared" in out


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--compare", str(bad), str(bad)])
    assert exit_info.value.code == 2
    assert "not a bench result" in capsys.readouterr().err


def test_callback_overhead_counts_the_evaluation_it_adds():
    """The row's extra work is the callback's sampling: twice the samples, twice the extra FLOPs."""
    from ldm.tools.bench.callbacks import sample_metrics_rows
    from ldm.tools.bench.cli import QUICK_RUN

    peaks = {"fp32": 1e11}
    rows = {n: sample_metrics_rows(["fp32"], 1, 0, CPU, peaks, QUICK_RUN + [f"callbacks.sample_metrics.num_samples={n}",
                                                                          "data.cache=false"])[0]
            for n in (8, 16)}
    for row in rows.values():
        extra = row["project"]["seconds"] - row["reference"]["seconds"]
        assert extra > 0 and row["ratio"] == pytest.approx(row["project"]["seconds"] / row["reference"]["seconds"])
        assert row["reference"]["label"] == "500 steps alone"  # the default run's validation interval
    extra_flops = {n: row["project"]["flops"] - row["reference"]["flops"] for n, row in rows.items()}
    assert extra_flops[8] > 0
    assert extra_flops[16] == pytest.approx(2 * extra_flops[8], rel=0.05)


def test_flops_are_counted_before_a_member_is_prepared():
    """Compiled kernels bypass the FLOP counter: `prepare` (switching compile on) must come after the count."""
    from ldm.tools.bench.measure import Comparison, Member, measure

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    state = {"prepared": 0, "counted_eager": None}

    def step():
        if state["counted_eager"] is None:
            state["counted_eager"] = state["prepared"] == 0
        return a @ b

    member = Member("m", step, prepare=lambda: state.__setitem__("prepared", state["prepared"] + 1))
    [row] = measure(Comparison("g", "n", 1, [member], rows=[(0, None)]), ["fp32"], 1, 0, CPU, {"fp32": 1e9})
    assert state == {"prepared": 1, "counted_eager": True}
    assert row["project"]["flops"] == 2 * 64**3


def test_each_bf16_step_casts_the_weights_it_has_now():
    """Autocast caches its casts of leaf weights until its outermost context exits: one context across steps
    would skip the casts that training (a context per step) pays, and compute with stale weights."""
    weight = torch.nn.Parameter(torch.ones(4, 4))
    seen = []

    def step():
        seen.append((torch.ones(1, 4) @ weight).float().sum().item())
        with torch.no_grad():
            weight.add_(1.0)  # the optimizer's in-place update

    alternate({"a": step}, steps=2, warmup=1, device=CPU, precision="bf16")
    assert seen == [16.0, 32.0, 48.0]


def test_the_finetune_row_holds_lora_against_full_with_peak_memory():
    """LoRA trains a few adapter weights and keeps no gradients or AdamW moments of the frozen base: at a tiny batch
    (activations small) its peak memory is far below full fine-tuning's, whose gradients and two moments triple
    the weights."""
    from ldm.tools.bench.finetune import finetune_rows

    [row] = finetune_rows(["fp32"], steps=1, warmup=0, device=CPU, peaks={"fp32": 1e9},
                          models={"tiny DiT": (["model.depth=2", "model.hidden_size=64"], 2)})
    assert row["project"]["label"] == "finetune=lora" and row["reference"]["label"] == "finetune=full"
    assert 0 < row["project"]["params"] < row["reference"]["params"] / 5  # the trained parameters only
    assert row["memory"]["ratio"] < 0.6, row["memory"]
    assert row["ratio"] > 0
