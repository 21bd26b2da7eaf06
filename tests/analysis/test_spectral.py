"""Per-matrix spectral measures against constructions with known answers."""

import math

import pytest
import torch

from pica.analysis import energy_fraction, intruder_cosines, principal_angles
from pica.analysis.spectral import top_right_subspace


def _orthonormal_rows(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=generator, dtype=torch.float64))
    return q.T  # (rows, cols)


def test_energy_fraction_is_one_inside_zero_outside_and_r_over_in_for_random():
    basis = _orthonormal_rows(48, 48)
    inside, outside = basis[:8], basis[8:]
    generator = torch.Generator().manual_seed(1)
    m = torch.randn(20, 8, generator=generator, dtype=torch.float64)
    assert energy_fraction(m @ inside, inside) == pytest.approx(1.0, abs=1e-12)
    assert energy_fraction(torch.randn(20, 40, generator=generator, dtype=torch.float64) @ outside, inside) == \
        pytest.approx(0.0, abs=1e-12)
    random_fractions = [energy_fraction(torch.randn(64, 48, generator=generator), inside) for _ in range(200)]
    assert sum(random_fractions) / 200 == pytest.approx(8 / 48, rel=0.1)
    assert math.isnan(energy_fraction(torch.zeros(4, 48), inside))


def test_principal_angles_known_rotation():
    basis = _orthonormal_rows(6, 6)
    first = basis[:2]
    theta = math.radians(30)
    rotated = torch.stack([basis[0], math.cos(theta) * basis[1] + math.sin(theta) * basis[2]])
    angles = principal_angles(first, rotated)
    assert angles.tolist() == pytest.approx([0.0, 30.0], abs=1e-5)
    assert principal_angles(first, basis[2:4]).tolist() == pytest.approx([90.0, 90.0], abs=1e-5)


def test_top_right_subspace_spans_the_leading_directions_and_checks_rank():
    u, v = _orthonormal_rows(10, 10, seed=2).T, _orthonormal_rows(10, 10, seed=3)
    weight = u @ torch.diag(torch.arange(10, 0, -1, dtype=torch.float64)) @ v  # σ = 10..1, V rows = v
    assert principal_angles(top_right_subspace(weight, 3), v[:3]).max() < 1e-5
    with pytest.raises(ValueError, match="rank must be in"):
        top_right_subspace(weight, 11)


def test_intruder_cosines_find_a_new_dominant_direction_and_none_without_change():
    generator = torch.Generator().manual_seed(0)
    base = torch.diag(torch.linspace(2.0, 1.0, 64, dtype=torch.float64))  # U = identity
    assert intruder_cosines(base, base.clone(), top_k=5).min() == pytest.approx(1.0)
    direction = torch.randn(64, generator=generator, dtype=torch.float64)
    direction /= direction.norm()
    tuned = base + 10.0 * torch.outer(direction, torch.randn(64, generator=generator, dtype=torch.float64) / 8)
    cosines = intruder_cosines(base, tuned, top_k=3)
    assert cosines.shape == (3,)
    assert cosines[0] < 0.5 and (cosines[1:] > 0.5).all()  # only the injected direction intrudes
    assert cosines[0] == pytest.approx(direction.abs().max().item(), abs=0.05)
    with pytest.raises(ValueError, match="differ in shape"):
        intruder_cosines(base, base[:10])
