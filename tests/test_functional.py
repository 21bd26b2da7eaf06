import torch

from pica.functional import delta_weight, pica_delta


def test_pica_delta_equals_effective_weight_product():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=generator)
    projector = torch.linalg.qr(torch.randn(12, 4, generator=generator)).Q.T  # (4, 12)
    update = torch.randn(7, 4, generator=generator)
    expected = x @ (update @ projector).T
    assert torch.allclose(pica_delta(x, projector, update), expected, atol=1e-5)
    assert torch.allclose(delta_weight(projector, update), update @ projector)


def test_pica_delta_computes_in_update_dtype():
    x = torch.randn(2, 8).to(torch.bfloat16)
    projector = torch.eye(8)[:3]
    update = torch.randn(5, 3)
    out = pica_delta(x, projector, update)
    assert out.dtype == torch.float32
    assert torch.allclose(out, x.float()[:, :3] @ update.T)
