"""Weight fingerprints: robust to rounding, different for another weight."""

import torch

from pica.fingerprint import fingerprint_distance, weight_fingerprint


def test_fingerprint_tolerates_rounding_and_detects_another_weight():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 48, generator=generator)
    other = torch.randn(64, 48, generator=generator)
    fingerprint = weight_fingerprint(weight)
    assert fingerprint.dtype == torch.float64 and fingerprint.shape == (9,)
    assert fingerprint_distance(fingerprint, weight_fingerprint(weight.to(torch.bfloat16))) < 5e-3
    assert fingerprint_distance(fingerprint, weight_fingerprint(weight.to(torch.float16))) < 1e-3
    assert fingerprint_distance(fingerprint, weight_fingerprint(other)) > 0.1
    assert fingerprint_distance(fingerprint, weight_fingerprint(weight * 1.05)) > 0.03
