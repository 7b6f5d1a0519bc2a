"""Sampler error versus network calls on a 4-D Gaussian with an exact model.

Run `python -m ldm.tools.sampler_table`. The error is the 2-Wasserstein distance between N(m, S)
and the Gaussian fitted to the output. Deterministic samplers are affine in the noise here, so
their output law is computed exactly from D + 1 inputs; stochastic ones are estimated from samples
and floor at the Monte-Carlo error (~0.02 with 20k samples).

Reading it: ddpm, v and x0 share a data row, and an exact model gives every target the same
(x0_hat, noise_hat), so their columns agree. Starting from sigma(1) * noise ignores alpha(1) * m,
which leaves a floor for VP with alpha(1) > 0 (~0.006 for linear betas) and for EDM's finite
sigma_max (~0.012). The last step, to t = 0, is first order by design; its error is of order
sigma_last^2, which on the discrete VP grids is only O(1 / steps) and slows heun and dpmpp_2m there."""

from __future__ import annotations

import argparse

import torch

from ldm.samplers import Ancestral, DPMSolverPP2M, Euler, EulerAncestral, Heun
from ldm.schedules import DDPM, EDM, RectifiedFlow, TrigFlow, VPrediction, X0Prediction
from ldm.tools.exact_gaussian import gaussian_problem
from ldm.tools.w2 import sampler_error


def parameterizations() -> dict:
    return {
        "flow": RectifiedFlow(),
        "flow_s3": RectifiedFlow(shift=3.0),
        "ddpm": DDPM(),
        "v": VPrediction(),
        "x0": X0Prediction(),
        "v_ztsnr": VPrediction(beta_schedule="scaled_linear", zero_terminal_snr=True),
        "edm": EDM(),
        "trig": TrigFlow(),
    }


def samplers() -> dict:
    return {
        "euler": Euler(),
        "heun": Heun(),
        "dpmpp_2m": DPMSolverPP2M(),
        "ancestral": Ancestral(),
        # eta = 1 repeats `ancestral` draw for draw, so show the half-way sampler instead.
        "euler_anc_0.5": EulerAncestral(eta=0.5),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--samples", type=int, default=20000, help="for the stochastic samplers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tensors of a few thousand numbers: threads only add overhead
    data, schedules = gaussian_problem(), parameterizations()
    print(f"W2 to N(m, S), 4-D; stochastic samplers: Monte Carlo with {args.samples} samples")
    print(f"{'sampler':<16}{'steps':>6}{'calls':>6}" + "".join(f"{name:>10}" for name in schedules))
    for sampler_name, sampler in samplers().items():
        for steps in args.steps:
            errors = [sampler_error(sampler, p, data, steps, args.samples) for p in schedules.values()]
            row = f"{sampler_name:<16}{steps:>6}{sampler.calls(steps):>6}"
            print(row + "".join(f"{e:>10.4f}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
