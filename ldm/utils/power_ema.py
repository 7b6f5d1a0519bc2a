"""Power-function EMA profiles and their post-hoc reconstruction (Karras et al. 2024, EDM2, section 3, appendix C).

A power-function EMA at training time t averages the weights theta(tau), 0 < tau <= t, with the profile
p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1). Its length is given by sigma_rel, the profile's standard
deviation relative to t. Tracked with the decay beta(t) = (1 - 1/t)^(gamma + 1) after optimizer step t
(t = 1, 2, ...), the average is exactly that profile integrated over the piecewise-constant trajectory
theta(tau) = theta_ceil(tau): step k's weights get (k^(gamma + 1) - (k - 1)^(gamma + 1)) / t^(gamma + 1).

After training, a profile of any length at snapshot time t_r is approximated by a weighted sum of the tracked
profiles at their snapshot times: the weights solve the least-squares problem in L2 over tau, whose normal
equations need only the closed-form inner products of two power-function profiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: sigma_rel at gamma = 0 (the uniform average of all weights so far): the longest profile, 1 / sqrt(12)
MAX_SIGMA_REL = 12 ** -0.5


def sigma_rel_of(gamma: float | np.ndarray) -> np.ndarray:
    """The profile's standard deviation relative to t: sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent with this sigma_rel: the largest real root of gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s,
    s = sigma_rel^-2 (the relation above, squared and multiplied out); positive for sigma_rel < 1 / sqrt(12)."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel={sigma_rel} must be in (0, {MAX_SIGMA_REL:.4f})")
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def decay(gamma: float, step: int) -> float:
    """The EMA's beta after optimizer step `step` (1, 2, ...): (1 - 1/step)^(gamma + 1); 0 at step 1 (a copy)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = integral over tau of the two profiles' product, for every pair (broadcast).

    With m = min(t_a, t_b) the integral of (gamma_a + 1)(gamma_b + 1) tau^(gamma_a + gamma_b) / (t_a^(gamma_a + 1)
    t_b^(gamma_b + 1)) from 0 to m; written with the ratio m / t <= 1 so that large exponents stay finite."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    shorter = np.minimum(t_a, t_b)
    scale = (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * shorter)
    return scale * (shorter / t_a) ** (gamma_a + 1) * (shorter / t_b) ** (gamma_b + 1)


def solve_weights(times: Sequence[float], gammas: Sequence[float], t_out: float, gamma_out: float | np.ndarray
                  ) -> tuple[np.ndarray, float | np.ndarray]:
    """Weights w (one per tracked average) with sum_i w_i p_i closest to the profile (t_out, gamma_out), and the
    fit's relative L2 error ||sum_i w_i p_i - p_out|| / ||p_out||; for an array of gamma_out, a column and an
    error for each.

    The normal equations A w = b of the least-squares fit, A_ij = <p_i, p_j>, b_i = <p_i, p_out>; the weights are
    then scaled to sum to 1, so that a constant trajectory is reproduced exactly."""
    times, gammas = np.asarray(times, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gamma_out = np.asarray(gamma_out, dtype=np.float64)
    outs = np.atleast_1d(gamma_out)
    gram = inner_products(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    target = inner_products(times[:, None], gammas[:, None], t_out, outs[None, :])  # (tracked, outputs)
    weights = np.linalg.lstsq(gram, target, rcond=None)[0]
    weights = weights / weights.sum(axis=0)
    target_norm = inner_products(t_out, outs, t_out, outs)
    residual = np.einsum("im,ij,jm->m", weights, gram, weights) - 2.0 * (weights * target).sum(axis=0) + target_norm
    errors = np.sqrt(np.maximum(residual, 0.0) / target_norm)
    return (weights[:, 0], float(errors[0])) if gamma_out.ndim == 0 else (weights, errors)
