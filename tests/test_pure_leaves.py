"""The maths is usable without peft and transformers (DESIGN §2: the leaves stay importable)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_leaves_import_and_compute_with_peft_and_transformers_blocked():
    script = textwrap.dedent("""
        import sys
        sys.modules["peft"] = sys.modules["transformers"] = None  # any import of them fails
        import torch
        import pica.projector, pica.projector_batch, pica.functional, pica.io, pica.sketch, pica.grouping
        import pica.naming, pica.random_subspace
        import pica.adapter_format, pica.load_arguments, pica.wrapping
        weight = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
        projector = pica.projector.top_right_singular_vectors(weight, 3)  # (3, 8)
        assert projector.shape == (3, 8)
        assert torch.allclose(projector @ projector.T, torch.eye(3), atol=1e-5)
        update = torch.zeros(12, 3)
        assert torch.equal(pica.functional.pica_delta(torch.ones(2, 8), projector, update), torch.zeros(2, 12))
        assert pica.grouping.group_of("model.layers.3.q_proj", True) == "model.layers.*.q_proj"
        assert "peft" not in [m for m in sys.modules if sys.modules[m] is not None]
        try:
            pica.PiCaConfig
        except ImportError:
            print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def _run(script: str) -> str:
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_importing_the_leaves_imports_neither_peft_nor_transformers_even_when_installed():
    script = ("import sys, pica.projector, pica.projector_batch, pica.functional, pica.fingerprint, pica.io, "
              "pica.sketch, pica.grouping, pica.naming, pica.random_subspace, pica.module_state, pica.projector_sharing, "
              "pica.sharded_state, pica.shared_storage, pica.default_targets, pica.row_adapters; "
              "import pica.adapter_format, pica.load_arguments, pica.wrapping; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'transformers')))")
    assert _run(script) == "[]"


def test_base_weight_readers_import_without_peft():
    script = ("import sys; sys.modules['peft'] = None; import pica.base_weights, pica.quantization_record; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'peft' and sys.modules[m] is not None))")
    assert _run(script) == "[]"


@pytest.mark.parametrize("order", ["import pica; import peft", "import peft; import pica",
                                   "import pica; from peft import PeftModel"])
def test_import_pica_registers_the_method_with_peft_in_either_order(order):
    script = (f"{order}; import sys; from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as m; "
              "registered = 'pica.tuner' in sys.modules and 'PICA' in [str(getattr(k, 'value', k)) for k in m]; "
              "from pica.tuner import PICA_PEFT_TYPE, PiCaConfig, integration; "  # only after the check above
              "assert registered and m[PICA_PEFT_TYPE] is PiCaConfig and integration.is_installed(); print('ok')")
    assert _run(script) == "ok"
