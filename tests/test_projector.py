import pytest
import torch

from pica.projector import canonicalize_signs, top_right_singular_vectors


def _decaying(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(out_features, min(out_features, in_features), generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(in_features, min(out_features, in_features), generator=generator, dtype=torch.float64)).Q
    spectrum = torch.logspace(0, -3, min(out_features, in_features), dtype=torch.float64)
    return (left * spectrum) @ right.T  # (out, in)


SHAPES = [(48, 48), (96, 32), (32, 96), (20, 160)]


def _max_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sine of the largest principal angle between the row spaces of orthonormal a and b."""
    a, b = a.double(), b.double()
    return float(torch.linalg.matrix_norm(a - (a @ b.T) @ b, ord=2))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["random", "decaying"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_orthonormal_and_span_top_subspace(shape, kind, dtype):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(*shape, generator=generator) if kind == "random" else _decaying(*shape, seed=2).float()
    rank = min(shape) // 3
    projector = top_right_singular_vectors(weight, rank, dtype)
    assert projector.shape == (rank, shape[1]) and projector.dtype == dtype
    eye = torch.eye(rank, dtype=torch.float64)
    assert torch.allclose(projector.double() @ projector.double().T, eye, atol=1e-5)
    reference = torch.linalg.svd(weight.double(), full_matrices=False).Vh[:rank]
    assert _max_principal_angle(projector, reference) < (1e-3 if dtype == torch.float32 else 1e-8)
    energy = torch.linalg.matrix_norm(weight.double() @ projector.double().T) ** 2
    top_energy = (torch.linalg.svdvals(weight.double())[:rank] ** 2).sum()
    assert abs(float(energy / top_energy) - 1) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_signs_agree_across_compute_and_source_dtypes(shape):
    weight = _decaying(*shape, seed=3)
    rank = min(shape) // 4
    reference = top_right_singular_vectors(weight, rank, torch.float64)
    for source in (weight.float(), weight):
        for compute in (torch.float32, torch.float64):
            projector = top_right_singular_vectors(source, rank, compute).double()
            assert torch.allclose(projector, reference, atol=1e-3), (source.dtype, compute)
    rounded = weight.to(torch.bfloat16)
    assert torch.allclose(
        top_right_singular_vectors(rounded, rank, torch.float32).double(),
        top_right_singular_vectors(rounded, rank, torch.float64),
        atol=1e-3,
    )


def test_canonical_sign_rule():
    rows = torch.tensor([[0.1, -0.9, 0.2], [0.5, 0.1, -0.2]])
    canonical = canonicalize_signs(rows)
    assert torch.equal(canonical, torch.tensor([[-0.1, 0.9, -0.2], [0.5, 0.1, -0.2]]))
    assert torch.equal(canonicalize_signs(-rows), canonical)


def test_rank_deficient_wide_matrix_falls_back_and_stays_orthonormal():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 64, generator=generator, dtype=torch.float64)
    projector = top_right_singular_vectors(weight, 8, torch.float64)
    assert torch.allclose(projector @ projector.T, torch.eye(8, dtype=torch.float64), atol=1e-8)
    reference = torch.linalg.svd(weight, full_matrices=False).Vh[:3]
    assert _max_principal_angle(projector[:3], reference) < 1e-6


@pytest.mark.parametrize("rank", [0, -1, 17, 2.0, True])
def test_bad_rank_is_rejected(rank):
    with pytest.raises(ValueError, match="rank"):
        top_right_singular_vectors(torch.randn(16, 32), rank)


def test_non_finite_weight_is_rejected():
    weight = torch.randn(8, 8)
    weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        top_right_singular_vectors(weight, 2)
