"""The fast exact projector: Gram eigenbasis + float64 Rayleigh-Ritz, its accuracy and its fallbacks."""

import logging

import pytest
import torch

from pica.projector import _gram, top_right_singular_vectors


def _spectrum_matrix(out_features: int, in_features: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = min(out_features, in_features)
    left = torch.linalg.qr(torch.randn(out_features, size, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(in_features, size, generator=generator, dtype=torch.float64)).Q
    return ((left * spectrum) @ right.T).float()  # (out, in)


def _weight(kind: str, shape: tuple[int, int]) -> torch.Tensor:
    if kind == "random":
        return torch.randn(*shape, generator=torch.Generator().manual_seed(5)) * 0.02
    return _spectrum_matrix(*shape, torch.logspace(0, -2, min(shape), dtype=torch.float64), seed=6)


def _max_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.matrix_norm(a - (a @ b.T) @ b, ord=2))


@pytest.mark.parametrize("shape", [(384, 128), (128, 384)])
@pytest.mark.parametrize("kind", ["random", "decaying"])
def test_gram_route_meets_issue_accuracy_and_beats_fp32_svd(shape, kind, caplog):
    weight = _weight(kind, shape)
    rank = 32  # basis 64 < 128: the Gram route, not the small-problem SVD
    with caplog.at_level(logging.INFO, logger="pica.projector"):
        projector = top_right_singular_vectors(weight, rank)
    if kind == "random":
        assert not caplog.records  # flat spectrum: the float32 Gram is accepted, no fallback
    reference = torch.linalg.svd(weight.double(), full_matrices=False)
    eye = torch.eye(rank, dtype=torch.float64)
    assert (projector.double() @ projector.double().T - eye).abs().max() < 1e-5
    energy = torch.linalg.matrix_norm(weight.double() @ projector.double().T) ** 2
    assert abs(1 - float(energy / (reference.S[:rank] ** 2).sum())) < 1e-5
    authors = torch.linalg.svd(weight, full_matrices=False).Vh[:rank]  # fp32 full SVD as the authors do
    ours_angle, authors_angle = _max_angle(projector, reference.Vh[:rank]), _max_angle(authors, reference.Vh[:rank])
    assert ours_angle <= max(authors_angle, 1e-6), (ours_angle, authors_angle)
    pivot = projector.abs().argmax(dim=1)
    assert (projector.gather(1, pivot[:, None]) > 0).all()  # canonical signs


def test_block_triangular_gram_equals_full_product():
    side = torch.randn(300, 530, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(_gram(side), side.T @ side, atol=1e-10)
    assert torch.equal(_gram(side), _gram(side).T)


def test_steep_spectrum_retries_the_gram_in_float64(caplog):
    spectrum = torch.logspace(0, -5, 128, dtype=torch.float64)  # σ_32 / σ_1 ≈ 5e-2, λ ratio 3e-3 below fp32 reach
    weight = _spectrum_matrix(128, 512, spectrum, seed=1)
    with caplog.at_level(logging.INFO, logger="pica.projector"):
        projector = top_right_singular_vectors(weight, 32)
    assert any("retrying in float64" in record.getMessage() for record in caplog.records)
    reference = torch.linalg.svd(weight.double(), full_matrices=False).Vh[:32]
    assert _max_angle(projector, reference) < 1e-6


def test_rank_deficient_weight_falls_back_to_thin_svd(caplog):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 5, generator=generator, dtype=torch.float64) @ torch.randn(5, 150, generator=generator,
                                                                                         dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="pica.projector"):
        projector = top_right_singular_vectors(weight, 20)
    assert any("thin SVD" in record.getMessage() for record in caplog.records)
    assert torch.allclose(projector.double() @ projector.double().T, torch.eye(20, dtype=torch.float64), atol=1e-5)
    reference = torch.linalg.svd(weight, full_matrices=False).Vh[:5]
    assert _max_angle(projector[:5], reference) < 1e-5


def test_repeated_singular_values_still_give_an_orthonormal_top_subspace():
    spectrum = torch.cat([torch.full((40,), 2.0), torch.linspace(1, 0.1, 88)]).double()  # σ_1 = … = σ_40
    weight = _spectrum_matrix(128, 256, spectrum, seed=2)
    projector = top_right_singular_vectors(weight, 40)
    reference = torch.linalg.svd(weight.double(), full_matrices=False).Vh[:40]
    assert _max_angle(projector, reference) < 1e-5  # the subspace is unique even though the vectors are not


def test_many_matches_single_calls_bitwise_whatever_the_thread_count():
    from pica.projector_batch import top_right_singular_vectors_many

    generator = torch.Generator().manual_seed(11)
    weights = [torch.randn(shape, generator=generator) for shape in [(96, 64), (64, 200), (300, 64), (64, 64)]]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        single = [top_right_singular_vectors(w, 16) for w in weights]
        seen: list[int] = []
        many = top_right_singular_vectors_many(weights, 16, workers=2, done=seen.append)
        assert torch.get_num_threads() == 2  # restored
        torch.set_num_threads(1)
        one_thread = [top_right_singular_vectors(w, 16) for w in weights]
        sequential = top_right_singular_vectors_many(weights, 16, workers=1)
    finally:
        torch.set_num_threads(previous)
    assert sorted(seen) == [0, 1, 2, 3]
    for results in (many, one_thread, sequential):
        assert all(torch.equal(a, b) for a, b in zip(single, results))
    assert [tuple(p.shape) for p in many] == [(16, 64), (16, 200), (16, 64), (16, 64)]


def test_many_propagates_errors_and_rejects_bad_workers():
    from pica.projector_batch import top_right_singular_vectors_many

    with pytest.raises(ValueError, match="workers must be >= 1"):
        top_right_singular_vectors_many([torch.randn(8, 8)], 2, workers=0)
    with pytest.raises(ValueError, match="rank must be an int"):
        top_right_singular_vectors_many([torch.randn(8, 8), torch.randn(4, 8)], 6, workers=2)


def test_default_workers_fit_in_half_the_available_memory(monkeypatch, caplog):
    import types

    import psutil

    from pica.projector_batch import _default_workers, projector_task_bytes, top_right_singular_vectors_many

    shapes = [(300, 64), (64, 200), (96, 64)]
    largest = projector_task_bytes((300, 64), 16)
    assert largest == 8 * 300 * 64 + 32 * 64 * 64 + 16 * 300 * 48
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=10**12))
        assert _default_workers(shapes, 16) == 4
        monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=5 * largest))
        assert _default_workers(shapes, 16) == 2
        monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=largest))
        assert _default_workers(shapes, 16) == 1
        weights = [torch.randn(shape, generator=torch.Generator().manual_seed(5)) for shape in shapes]
        with caplog.at_level(logging.INFO, logger="pica.projector_batch"):
            capped = top_right_singular_vectors_many(weights, 16)
        assert "1 matrices at once instead of 4" in caplog.text
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, top_right_singular_vectors(w, 16)) for a, w in zip(capped, weights))
