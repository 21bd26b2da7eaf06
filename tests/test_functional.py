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


import pytest  # noqa: E402

from pica.functional import cheaper_form, merged_pica_linear  # noqa: E402


def _reference(x, weight, bias, projector, update, in_out):
    base = x @ weight + (bias if bias is not None else 0) if in_out else torch.nn.functional.linear(x, weight, bias)
    return base + (x @ projector.T) @ update.T


@pytest.mark.parametrize("in_out", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_merged_op_gradients_equal_plain_reference(in_out, with_bias, weight_grad):
    generator = torch.Generator().manual_seed(0)
    in_features, out_features, rank = 24, 40, 6
    x = torch.randn(3, 11, in_features, generator=generator)
    weight = torch.randn(*((in_features, out_features) if in_out else (out_features, in_features)), generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    projector = torch.linalg.qr(torch.randn(in_features, rank, generator=generator)).Q.T.contiguous()  # (rank, in)
    update = torch.randn(out_features, rank, generator=generator)
    grad_out = torch.randn(3, 11, out_features, generator=generator)
    results = []
    for fn in (merged_pica_linear, _reference):
        leaves = [t.clone().requires_grad_(t is not None and (weight_grad or t is not w)) if t is not None else None
                  for t, w in ((x, weight), (weight, weight), (bias, weight), (update, weight))]
        xs, ws, bs, us = leaves
        out = fn(xs, ws, bs, projector, us, in_out)
        out.backward(grad_out)
        results.append((out, xs.grad, ws.grad, None if bs is None else bs.grad, us.grad))
    for got, expected in zip(*results):
        if expected is None:
            assert got is None
        else:
            assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_merged_op_without_input_grad_saves_no_merged_weight_and_gives_update_grad():
    x = torch.randn(5, 8)
    weight = torch.randn(6, 8)
    projector = torch.eye(8)[:3]
    update = torch.randn(6, 3, requires_grad=True)
    out = merged_pica_linear(x, weight, None, projector, update)
    out.sum().backward()
    assert torch.allclose(update.grad, torch.ones(5, 6).T @ (x @ projector.T))


def test_cheaper_form_follows_flop_counts():
    # the shapes: merged (≈ r/d + r/N) beats factored (≈ 2.5 r/d)
    assert cheaper_form(2048, 2048, 2048, 256, input_grad=True, update_grad=True) == "merged"
    # few tokens (generation, short sequences): the factored form is cheaper
    assert cheaper_form(16, 2048, 2048, 256, input_grad=True, update_grad=True) == "factored"
    assert cheaper_form(1, 2048, 2048, 256, input_grad=False, update_grad=False) == "factored"
    # boundary for square layers with both gradients: N > 2d/3
    assert cheaper_form(1300, 2048, 2048, 256, True, True) == "factored"
    assert cheaper_form(1400, 2048, 2048, 256, True, True) == "merged"
