"""GPU correctness check (not a test; needs CUDA). Prints one JSON object on stdout.

Sections (each in its own try/except: one failure is recorded as ``"error"`` and the rest still run):

* ``environment``: versions (and where each package was found), the GPU, the CPU's AVX512-BF16, the
  bitsandbytes native library loaded.
* ``projector_cpu_vs_gpu``, ``gpu_saved_cpu_loaded``, ``bf16_training``, ``gemma2b_down_proj_rank256_seconds``:
  projector/fingerprint agreement CPU vs GPU, a GPU-saved adapter reloaded on the CPU, bf16 training steps,
  projector time on one Gemma-2B-shaped matrix.
* ``bnb_4bit_layouts`` (only where ``import bitsandbytes`` works; else the reason): for nf4/fp4 × double
  quantisation off/on × ``quant_storage`` uint8/bfloat16/float32 × source dtype float32/bfloat16, the same
  weight quantised on CUDA (``Linear4bit.to("cuda")``: bitsandbytes's CUDA layout, never repacked) and on the
  CPU. Per row: codes and exact reads CPU vs CUDA; pica's canonical read (``dequantized(module,
  torch.bfloat16)``) CPU vs CUDA (max |Δ|, bitwise flag) and vs the CPU-packed layout (packed by
  bitsandbytes's own conversion); the exact read (``dequantized(module)``) vs bitsandbytes's
  ``dequantize_4bit``; that reading changes nothing (storage address and contents, every ``quant_state``
  field); a CUDA forward against ``x Wᵀ`` and the read after it; ``P`` CPU vs CUDA (max |ΔP|, sign flips,
  largest principal-angle sine).
* ``bnb_4bit_end_to_end``: a tiny Llama of packable sizes (``tests/quantized_fixtures.py`` ``PACKABLE``) loaded
  4-bit on CUDA, one no-grad forward (a served base), PiCa rank 4 (``projector_storage`` full and compact),
  random ``M``, saved, loaded onto the CPU 4-bit base of the same checkpoint (served as bitsandbytes does on
  this CPU, and unpacked) and onto its fp32 weights: ``P`` equal?, max |Δ logit| CPU vs GPU.
* ``bnb_8bit``: ``Linear8bitLt`` on CUDA (thresholds 0 and 6): the read after a forward (its scales move from
  the weight to the layer's state) equals the read before; CPU vs CUDA quantisation.

Run (repository root): ``python3 benchmarks/gpu_check.py > gpu_check.json``; on the lent GPU machine see
benchmarks/README.md ("GPU check") for the command that installs the trimmed bitsandbytes wheel first.
``--dry-run`` runs the bitsandbytes sections on the CPU in place of CUDA (the numbers mean nothing; it
checks the script where there is no GPU). ``--partial PATH`` rewrites the JSON there after every section,
so a crash or a time-out keeps what was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "src")):  # pica from src/ (never installed on the GPU machine), tests/ helpers
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "aenum", "bitsandbytes", "pytest", "numpy")
QUANT_TYPES = ("nf4", "fp4")
STORAGES = (torch.uint8, torch.bfloat16, torch.float32)
SOURCE_DTYPES = (torch.float32, torch.bfloat16)
LAYOUT_SHAPE = (256, 512)
"""(out, in) of the per-layout weight: sizes bitsandbytes can pack (in % 64 == 0, out % 32 == 0)."""
LAYOUT_RANK = 16


def _error(exc: BaseException) -> str:
    """One line naming the exception, then where it was raised (last frames)."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__}: {exc} [at {where}]"


def _attempt(row: dict, key: str, function) -> None:
    """``row[key] = function()``, or the error text."""
    try:
        row[key] = function()
    except Exception as exc:  # noqa: BLE001  (recorded, never lost)
        row[key] = {"error": _error(exc)}


class Report:
    """The JSON report, sections timed and guarded, rewritten to ``partial`` after each section."""

    def __init__(self, partial: str | None, budget_s: float) -> None:
        self.data: dict = {}
        self.partial, self.budget_s, self.started = partial, budget_s, time.perf_counter()

    @contextlib.contextmanager
    def section(self, name: str):
        entry: dict = {}
        self.data[name] = entry
        started = time.perf_counter()
        if started - self.started > self.budget_s:
            entry["skipped"] = f"time budget of {self.budget_s} s spent before this section"
            self.save()
            yield None
            return
        try:
            yield entry
        except Exception as exc:  # noqa: BLE001
            entry["error"] = _error(exc)
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 2)
            self.data["total_seconds"] = round(time.perf_counter() - self.started, 2)
            self.save()

    def save(self) -> None:
        if self.partial:
            Path(self.partial).write_text(json.dumps(self.data, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- environment


def environment(entry: dict, dry_run: bool) -> None:
    entry["python"] = platform.python_version()
    entry["platform"] = platform.platform()
    entry["dry_run"] = dry_run
    entry["sys_path_head"] = sys.path[:4]
    entry["PYTHONPATH"] = os.environ.get("PYTHONPATH")
    found: dict = {}
    for distribution in importlib.metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower()
        if name in PACKAGES:
            found.setdefault(name, []).append(f"{distribution.version} at {distribution.locate_file('')}")
    entry["installed"] = {name: sorted(found.get(name, [])) or "not installed" for name in PACKAGES}
    imported = {}
    for name in PACKAGES + ("pica",):
        try:
            module = importlib.import_module(name)
            imported[name] = f"{getattr(module, '__version__', '?')} from {Path(module.__file__).parent}"
        except Exception as exc:  # noqa: BLE001
            imported[name] = {"error": _error(exc)}
    entry["imported"] = imported
    entry["torch_cuda"] = torch.version.cuda
    entry["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        entry["device"] = torch.cuda.get_device_name()
        entry["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    entry["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    entry["cpu_count"] = os.cpu_count()
    try:
        entry["cpu_avx512_bf16"] = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError as exc:
        entry["cpu_avx512_bf16"] = {"error": _error(exc)}
    if isinstance(imported["bitsandbytes"], str):
        import bitsandbytes

        library = getattr(bitsandbytes.cextension, "lib", None)
        loaded = getattr(getattr(library, "_lib", None), "_name", "?")
        entry["bnb_native_library"] = f"{type(library).__name__} {loaded}"
        entry["bnb_has_avx512bf16"] = bool(bitsandbytes.functional.has_avx512bf16())
        package = Path(bitsandbytes.__file__).parent
        entry["bnb_libraries_present"] = sorted(p.name for p in package.glob("libbitsandbytes_*"))


# ------------------------------------------------------------------------- the sections before bitsandbytes


def projector_cpu_vs_gpu(entry: dict) -> None:
    from pica.fingerprint import fingerprint_distance, weight_fingerprint
    from pica.projector import top_right_singular_vectors

    generator = torch.Generator().manual_seed(0)
    shapes = [(256, 256), (1024, 256), (256, 2048), (2048, 512)]
    sign_flips, max_diff, max_fp = 0, 0.0, 0.0
    for shape in shapes:
        weight = torch.randn(*shape, generator=generator)
        rank = min(shape) // 4
        cpu = top_right_singular_vectors(weight, rank, torch.float64)
        gpu = top_right_singular_vectors(weight.cuda(), rank, torch.float64).cpu()
        sign_flips += int(((cpu * gpu).sum(dim=1) < 0).sum())
        max_diff = max(max_diff, float((cpu - gpu).abs().max()))
        max_fp = max(max_fp, fingerprint_distance(weight_fingerprint(weight), weight_fingerprint(weight.cuda())))
    entry.update({"shapes": shapes, "fp64_sign_flips": sign_flips, "fp64_max_abs_diff": max_diff,
                  "fingerprint_max_distance": max_fp})


def gpu_saved_cpu_loaded(entry: dict) -> None:
    from peft import PeftModel, get_peft_model

    from pica import PiCaConfig
    from tests.conftest import example_inputs, make_llama, model_output, randomize_updates

    model = get_peft_model(make_llama().cuda(), PiCaConfig(rank=4))
    randomize_updates(model)
    inputs = example_inputs("llama")
    gpu_logits = model_output(model, {k: v.cuda() for k, v in inputs.items()}).cpu()
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reloaded = PeftModel.from_pretrained(make_llama(), directory)
        cpu_logits = model_output(reloaded, inputs)
    entry["max_abs_logit_diff"] = float((gpu_logits - cpu_logits).abs().max())


def bf16_training(entry: dict) -> None:
    from peft import get_peft_model

    from pica import PiCaConfig
    from tests.conftest import example_inputs, make_llama, pica_layers

    model = get_peft_model(make_llama().cuda().to(torch.bfloat16), PiCaConfig(rank=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {k: v.cuda() for k, v in example_inputs("llama").items()}
    losses = []
    for _ in range(20):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    layers = list(pica_layers(model).values())
    entry.update({"loss_first": losses[0], "loss_last": losses[-1],
                  "m_dtypes": sorted({str(layer.get_update("default").dtype) for layer in layers}),
                  "distinct_trainable_tensors": len([p for p in model.parameters() if p.requires_grad])})


def projector_time(entry: dict) -> None:
    """Projector time on one Gemma-2B-shaped down_proj (2048x16384), rank 256, GPU fp32."""
    from pica.projector import top_right_singular_vectors

    weight = torch.randn(2048, 16384, device="cuda")
    top_right_singular_vectors(weight, 256)
    torch.cuda.synchronize()
    started = time.perf_counter()
    top_right_singular_vectors(weight, 256)
    torch.cuda.synchronize()
    ours = time.perf_counter() - started
    started = time.perf_counter()
    torch.linalg.svd(weight, full_matrices=False)
    torch.cuda.synchronize()
    entry.update({"pica_projector": round(ours, 4), "full_svd_fp32": round(time.perf_counter() - started, 4)})


# ------------------------------------------------------------------------------------ bitsandbytes: helpers


def _structured_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A CPU ``(out, in)`` weight with a decaying spectrum (a gap at every rank, as trained weights have)."""
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    k = 48
    left = torch.randn(out_features, k, generator=generator) * 0.85 ** torch.arange(k, dtype=torch.float32)
    low_rank = left @ torch.randn(k, in_features, generator=generator) / in_features**0.5
    return (0.5 * low_rank + 0.02 * torch.randn(out_features, in_features, generator=generator)).to(dtype)


def _fields(state) -> dict:
    """Every field of a bitsandbytes ``QuantState`` (nested ``state2`` flattened), tensors copied."""
    result = {}
    for key, value in vars(state).items():
        if type(value).__name__ == "QuantState":
            result.update({f"{key}.{k}": v for k, v in _fields(value).items()})
        elif isinstance(value, torch.Tensor):
            result[key] = (value.data_ptr(), value.dtype, tuple(value.shape), value.detach().clone())
        else:
            result[key] = value
    return result


def _snapshot(layer) -> dict:
    """The layer's weight storage (address, dtype, shape, contents) and its quantisation state's fields."""
    data = layer.weight.data
    snapshot = {"weight.data": (data.data_ptr(), data.dtype, tuple(data.shape), data.clone())}
    state = getattr(layer.weight, "quant_state", None)
    if state is not None:
        snapshot.update({f"quant_state.{k}": v for k, v in _fields(state).items()})
    for owner, name in ((layer.weight, "weight"), (getattr(layer, "state", None), "state")):
        for key in ("CB", "SCB"):
            value = getattr(owner, key, None) if owner is not None else None
            snapshot[f"{name}.{key}"] = None if value is None else (value.data_ptr(), value.dtype, value.clone())
    return snapshot


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (float storage of 4-bit codes holds NaN patterns: ``torch.equal`` is not enough)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().cpu().reshape(-1).view(torch.uint8)
    return bool(torch.equal(as_bytes(a), as_bytes(b)))


def _changed(before: dict, after: dict) -> list[str]:
    """Names of the fields that differ (address, dtype, shape or bytes for tensors)."""
    def same(a, b) -> bool:
        if isinstance(a, tuple) and a and isinstance(a[-1], torch.Tensor):
            if not (isinstance(b, tuple) and len(a) == len(b) and a[:-1] == b[:-1]):
                return False
            return _bitwise_equal(a[-1], b[-1])
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _bitwise_equal(a, b)
        return a == b
    return sorted(key for key in before.keys() | after.keys() if not same(before.get(key), after.get(key)))


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max |a − b| (as float32, on the CPU), relative to max |a|, and whether the two are bitwise equal."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return {"shapes": [tuple(a.shape), tuple(b.shape)], "dtypes": [str(a.dtype), str(b.dtype)],
                "bitwise_equal": False}
    difference = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    scale = float(a.float().abs().max()) if a.numel() else 0.0
    return {"max_abs_diff": difference, "relative": difference / scale if scale else None,
            "bitwise_equal": _bitwise_equal(a, b)}


def _compare_projectors(a: torch.Tensor, b: torch.Tensor) -> dict:
    """``P`` (rank, in) against ``P``: max |ΔP|, rows with opposite sign, largest principal-angle sine."""
    bitwise = _bitwise_equal(a, b)
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    basis_a, basis_b = torch.linalg.qr(a.T).Q, torch.linalg.qr(b.T).Q  # (in, rank) orthonormal, in float64
    residual = basis_a - basis_b @ (basis_b.T @ basis_a)  # the part of span(a) outside span(b)
    return {"max_abs_diff": float((a - b).abs().max()), "sign_flips": int(((a * b).sum(dim=1) < 0).sum()),
            "largest_sine": float(torch.linalg.matrix_norm(residual, ord=2)), "bitwise_equal": bitwise}


def _linear4bit(weight: torch.Tensor, quant_type: str, nested: bool, storage: torch.dtype, device: str):
    """``weight`` (CPU) in a ``Linear4bit`` quantised by moving it to ``device``, as users do (``layer.to(device)``)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type=quant_type, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=nested,
                                     quant_type=quant_type, quant_storage=storage, module=layer)
    layer = layer.to(device).eval()
    if not (layer.weight.bnb_quantized and layer.weight.device.type == torch.device(device).type):
        raise RuntimeError(f"Linear4bit.to({device!r}) left the weight unquantised or on {layer.weight.device}")
    return layer


# ----------------------------------------------------------------------------- bitsandbytes: 4-bit layouts


def four_bit_row(quant_type: str, nested: bool, storage: torch.dtype, source_dtype: torch.dtype,
                 device: str = "cuda", reference: str = "cpu") -> dict:
    """One layout: the same weight quantised on ``device`` and on ``reference``, read by pica (module docstring)."""
    import bitsandbytes as bnb

    from pica.projector import top_right_singular_vectors
    from pica.base_weights import dequantized

    row: dict = {"quant_type": quant_type, "double_quant": nested, "quant_storage": str(storage).removeprefix("torch."),
                 "source_dtype": str(source_dtype).removeprefix("torch.")}
    weight = _structured_weight(LAYOUT_SHAPE, source_dtype)
    gpu = _linear4bit(weight, quant_type, nested, storage, device)
    cpu = _linear4bit(weight, quant_type, nested, storage, reference)
    gpu_state = gpu.weight.quant_state
    row["gpu_layout"] = {"data": [str(gpu.weight.data.dtype), tuple(gpu.weight.data.shape)],
                         "absmax": [str(gpu_state.absmax.dtype), tuple(gpu_state.absmax.shape)],
                         "nested": gpu_state.nested, "dtype": str(gpu_state.dtype),
                         "packing_format_for_cpu": getattr(gpu_state, "packing_format_for_cpu", None)}
    before = {"gpu": _snapshot(gpu), "cpu": _snapshot(cpu)}
    reads: dict = {}
    for side, layer in (("gpu", gpu), ("cpu", cpu)):
        reads[side, "canonical"] = dequantized(layer, torch.bfloat16)
        reads[side, "exact"] = dequantized(layer)
        reads[side, "canonical_again"] = dequantized(layer, torch.bfloat16)
    row["reading_changed"] = {side: _changed(before[side], _snapshot(layer))
                              for side, layer in (("gpu", gpu), ("cpu", cpu))}
    row["canonical_read_repeatable"] = {side: _bitwise_equal(reads[side, "canonical"], reads[side, "canonical_again"])
                                        for side in ("gpu", "cpu")}
    _attempt(row, "codes_cpu_vs_gpu", lambda: {
        "equal_fraction": float((gpu.weight.data.cpu().view(torch.uint8) == cpu.weight.data.view(torch.uint8))
                                .float().mean()),
        "bitwise_equal": _bitwise_equal(gpu.weight.data, cpu.weight.data)})
    _attempt(row, "absmax_cpu_vs_gpu", lambda: _compare(cpu.weight.quant_state.absmax, gpu_state.absmax))
    row["canonical_read_cpu_vs_gpu"] = _compare(reads["cpu", "canonical"], reads["gpu", "canonical"])
    row["exact_read_cpu_vs_gpu"] = _compare(reads["cpu", "exact"], reads["gpu", "exact"])
    row["exact_read_vs_source"] = _compare(weight, reads["cpu", "exact"].cpu())
    for side, layer in (("gpu", gpu), ("cpu", cpu)):
        _attempt(row, f"exact_read_vs_bnb_dequantize_4bit_{side}", lambda layer=layer, side=side: _compare(
            bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), reads[side, "exact"]))

    def packed_cpu() -> dict:  # the CPU kernel's layout, packed by bitsandbytes's own conversion on a copy
        packed = copy.deepcopy(cpu)
        packed.weight.data, packed.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
            packed.weight.data, packed.weight.quant_state)
        packed_before = _snapshot(packed)
        result = _compare(reads["gpu", "canonical"], dequantized(packed, torch.bfloat16))
        result["reading_changed"] = _changed(packed_before, _snapshot(packed))
        return result
    _attempt(row, "canonical_read_cpu_packed_vs_gpu", packed_cpu)

    def forward() -> dict:  # a served request on the device: output against x Wᵀ, and the layer after it
        x = torch.randn(4, LAYOUT_SHAPE[1], generator=torch.Generator().manual_seed(1)).to(device)
        snapshot = _snapshot(gpu)
        with torch.no_grad():
            output = gpu(x)
        expected = torch.nn.functional.linear(x, reads["gpu", "exact"].float())
        return {"output_vs_x_Wt": _compare(expected, output.float()),
                "changed": _changed(snapshot, _snapshot(gpu)),
                "canonical_read_after_equals_before": _bitwise_equal(dequantized(gpu, torch.bfloat16),
                                                                     reads["gpu", "canonical"])}
    _attempt(row, "gpu_forward", forward)

    def projectors() -> dict:
        p_gpu = top_right_singular_vectors(reads["gpu", "canonical"], LAYOUT_RANK)  # computed on the device
        p_cpu = top_right_singular_vectors(reads["cpu", "canonical"], LAYOUT_RANK)
        result = _compare_projectors(p_cpu, p_gpu)
        matrix = reads["cpu", "canonical"].double().cpu()
        squares = torch.linalg.eigvalsh(matrix @ matrix.T).flip(0)  # σ², largest first (no float64 SVD: slow on CPUs)
        result["sigma_r_over_sigma_r_plus_1"] = float((squares[LAYOUT_RANK - 1] / squares[LAYOUT_RANK]).sqrt())
        return result
    _attempt(row, "projector_cpu_vs_gpu", projectors)
    return row


def four_bit_layouts(entry: dict, device: str) -> None:
    rows = []
    for quant_type in QUANT_TYPES:
        for nested in (False, True):
            for storage in STORAGES:
                for source_dtype in SOURCE_DTYPES:
                    try:
                        rows.append(four_bit_row(quant_type, nested, storage, source_dtype, device))
                    except Exception as exc:  # noqa: BLE001
                        rows.append({"quant_type": quant_type, "double_quant": nested, "quant_storage": str(storage),
                                     "source_dtype": str(source_dtype), "error": _error(exc)})
    entry["shape_out_in"], entry["rank"] = LAYOUT_SHAPE, LAYOUT_RANK
    entry["rows"] = rows
    entry["summary"] = _summarise(rows)


def _summarise(rows: list[dict]) -> dict:
    """The worst case over the rows of each comparison (errors counted)."""
    def worst(key: str, field: str):
        values = [row[key][field] for row in rows if isinstance(row.get(key), dict) and row[key].get(field) is not None]
        return max(values) if values else None

    def all_true(key: str, field: str = "bitwise_equal"):
        values = [row[key].get(field) for row in rows if isinstance(row.get(key), dict) and field in row[key]]
        return all(values) if values else None

    return {
        "rows": len(rows), "rows_with_errors": sum(1 for row in rows if "error" in json.dumps(row, default=str)),
        "canonical_read_cpu_vs_gpu_max_abs_diff": worst("canonical_read_cpu_vs_gpu", "max_abs_diff"),
        "canonical_read_cpu_vs_gpu_all_bitwise": all_true("canonical_read_cpu_vs_gpu"),
        "canonical_read_cpu_packed_vs_gpu_all_bitwise": all_true("canonical_read_cpu_packed_vs_gpu"),
        "codes_cpu_vs_gpu_all_bitwise": all_true("codes_cpu_vs_gpu"),
        "exact_read_vs_bnb_gpu_all_bitwise": all_true("exact_read_vs_bnb_dequantize_4bit_gpu"),
        "exact_read_vs_bnb_cpu_all_bitwise": all_true("exact_read_vs_bnb_dequantize_4bit_cpu"),
        "reading_changed_anything": sorted({f"{side}:{name}" for row in rows
                                            for side, names in row.get("reading_changed", {}).items()
                                            for name in names}),
        "gpu_forward_changed_anything": sorted({name for row in rows if isinstance(row.get("gpu_forward"), dict)
                                                for name in row["gpu_forward"].get("changed", [])}),
        "projector_max_abs_diff": worst("projector_cpu_vs_gpu", "max_abs_diff"),
        "projector_sign_flips": sum(row["projector_cpu_vs_gpu"].get("sign_flips", 0) for row in rows
                                    if isinstance(row.get("projector_cpu_vs_gpu"), dict)),
        "projector_largest_sine": worst("projector_cpu_vs_gpu", "largest_sine"),
    }


# ------------------------------------------------------------------------- bitsandbytes: 4-bit end to end


END_TO_END = ({"name": "nf4_double_quant_uint8", "scheme": "nf4", "extra": {"bnb_4bit_use_double_quant": True}},
              {"name": "fp4_bf16_storage", "scheme": "fp4", "extra": {"bnb_4bit_quant_storage": torch.bfloat16}})


def _pica_projectors(model) -> dict[str, torch.Tensor]:
    """Module name → the ``P`` of adapter ``default`` (CPU copies)."""
    from tests.conftest import pica_layers

    return {name: layer.pica_P["default"].detach().cpu() for name, layer in pica_layers(model).items()}


def _reload(base, adapter: Path, inputs: dict, gpu_projectors: dict, gpu_logits: torch.Tensor) -> dict:
    """Load ``adapter`` onto the CPU ``base``: its ``P`` and logits against the GPU model's."""
    from peft import PeftModel

    from pica.base_weights import is_cpu_packed
    from tests.conftest import model_output

    packed = sum(is_cpu_packed(module) for module in base.modules())
    loaded = PeftModel.from_pretrained(base, adapter)
    projectors = _pica_projectors(loaded)
    if projectors.keys() != gpu_projectors.keys():
        raise RuntimeError(f"adapted layers differ: {sorted(projectors.keys() ^ gpu_projectors.keys())[:4]}")
    comparisons = [_compare_projectors(gpu_projectors[name], projectors[name]) for name in projectors]
    logits = model_output(loaded, inputs)
    return {"cpu_packed_layers": packed, "layers": len(projectors),
            "P_all_bitwise_equal": all(c["bitwise_equal"] for c in comparisons),
            "P_max_abs_diff": max(c["max_abs_diff"] for c in comparisons),
            "P_sign_flips": sum(c["sign_flips"] for c in comparisons),
            "P_largest_sine": max(c["largest_sine"] for c in comparisons),
            "max_abs_logit_diff_vs_gpu": float((logits - gpu_logits).abs().max())}


def four_bit_end_to_end(entry: dict, device: str) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pica import PiCaConfig
    from pica.base_weights import keep_unpacked
    from tests.conftest import example_inputs, model_output, randomize_updates
    from tests.quantized_fixtures import PACKABLE, quantization_config, save_llama

    entry["model"] = {"tiny_llama": PACKABLE, "rank": 4, "compute_dtype": "float32"}
    inputs = example_inputs("llama")
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = save_llama(Path(scratch) / "base")

        def load(where: str, config, unpacked: bool = False):
            kwargs = {} if config is None else {"quantization_config": config, "device_map": where}
            model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs).eval()
            if unpacked:
                keep_unpacked(model)
            with torch.no_grad():  # one answered request: a served base
                model(**{k: v.to(model.device) for k, v in inputs.items()})
            return model

        for setting in END_TO_END:
            config = quantization_config(setting["scheme"], torch.float32, **setting["extra"])
            for storage in ("full", "compact"):
                run: dict = {"quantization": setting["name"], "projector_storage": storage}
                runs.append(run)
                try:
                    model = get_peft_model(load(device, config), PiCaConfig(rank=4, projector_storage=storage))
                    randomize_updates(model, seed=1)
                    device_inputs = {k: v.to(device) for k, v in inputs.items()}
                    gpu_logits = model_output(model, device_inputs).cpu()
                    gpu_projectors = _pica_projectors(model)
                    adapter = Path(scratch) / f"{setting['name']}_{storage}"
                    model.save_pretrained(adapter)
                    run["adapter_bytes"] = sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file())
                    after_save = model_output(model, device_inputs)
                    run["gpu_logits_unchanged_by_save"] = _bitwise_equal(after_save, gpu_logits)
                    run["max_abs_logit_gpu"] = float(gpu_logits.abs().max())
                    del model
                except Exception as exc:  # noqa: BLE001
                    run["error"] = _error(exc)
                    continue
                bases = {"cpu_4bit_served": lambda: load("cpu", config),
                         "cpu_4bit_unpacked": lambda: load("cpu", config, unpacked=True),
                         "cpu_fp32_weights": lambda: load("cpu", None)}
                for target, make_base in bases.items():
                    _attempt(run, target, lambda make_base=make_base: _reload(make_base(), adapter, inputs,
                                                                              gpu_projectors, gpu_logits))
    entry["runs"] = runs
    entry["note"] = ("cpu_fp32_weights: P is read from the fp32 weights quantised again by the recorded scheme, "
                     "but the base computes in fp32, so its logits differ from the 4-bit GPU model by the "
                     "quantisation error")


# ------------------------------------------------------------------------------------- bitsandbytes: 8-bit


def eight_bit_row(threshold: float, device: str = "cuda", reference: str = "cpu") -> dict:
    import bitsandbytes as bnb

    from pica.base_weights import dequantized

    weight = _structured_weight(LAYOUT_SHAPE, torch.float16)

    def make(where: str):
        layer = bnb.nn.Linear8bitLt(LAYOUT_SHAPE[1], LAYOUT_SHAPE[0], bias=False, has_fp16_weights=False,
                                    threshold=threshold)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
        return layer.to(where).eval()

    row: dict = {"threshold": threshold}
    gpu, cpu = make(device), make(reference)
    row["scales_before_forward"] = {"on_weight": gpu.weight.SCB is not None, "on_state": gpu.state.SCB is not None}
    snapshot = _snapshot(gpu)
    before = dequantized(gpu)
    row["reading_changed"] = _changed(snapshot, _snapshot(gpu))
    x = torch.randn(4, LAYOUT_SHAPE[1], generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    x[:, :3] *= 20  # outlier columns: above threshold 6 they take LLM.int8()'s fp16 path
    x = x.to(device, torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    with torch.no_grad():
        output = gpu(x)
    row["scales_after_forward"] = {"on_weight": getattr(gpu.weight, "SCB", None) is not None,
                                   "on_state": gpu.state.SCB is not None}
    after = dequantized(gpu)
    row["read_after_forward_vs_before"] = _compare(before, after)
    row["output_vs_x_Wt"] = _compare(torch.nn.functional.linear(x.float(), before.float()), output.float())
    row["read_cpu_vs_gpu"] = _compare(dequantized(cpu), before)
    row["codes_cpu_vs_gpu_equal_fraction"] = float((cpu.weight.data == gpu.weight.data.cpu()).float().mean())
    return row


def eight_bit(entry: dict, device: str) -> None:
    rows = []
    for threshold in (0.0, 6.0):
        try:
            rows.append(eight_bit_row(threshold, device))
        except Exception as exc:  # noqa: BLE001
            rows.append({"threshold": threshold, "error": _error(exc)})
    entry["rows"] = rows


# ------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    report = Report(args.partial, args.budget_s)
    report.data["command"] = "python3 " + " ".join([sys.argv[0].removeprefix(str(ROOT) + "/")] + sys.argv[1:])
    device = "cpu" if args.dry_run else "cuda"
    with report.section("environment") as entry:
        environment(entry, args.dry_run)
    if not args.dry_run:
        for name, function in (("projector_cpu_vs_gpu", projector_cpu_vs_gpu),
                               ("gpu_saved_cpu_loaded", gpu_saved_cpu_loaded), ("bf16_training", bf16_training),
                               ("gemma2b_down_proj_rank256_seconds", projector_time)):
            with report.section(name) as entry:
                if entry is not None:
                    function(entry)
    try:
        import bitsandbytes  # noqa: F401
        bnb_error = None
    except Exception as exc:  # noqa: BLE001
        bnb_error = _error(exc)
    for name, function in (("bnb_4bit_layouts", four_bit_layouts), ("bnb_4bit_end_to_end", four_bit_end_to_end),
                           ("bnb_8bit", eight_bit)):
        with report.section(name) as entry:
            if entry is None:
                continue
            if bnb_error is not None:
                entry["skipped"] = f"import bitsandbytes failed: {bnb_error}"
            else:
                function(entry, device)
    return report.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run the bitsandbytes sections with the CPU in place of CUDA (checks the script, no GPU)")
    parser.add_argument("--partial", help="rewrite the JSON report to this file after every section")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="skip the sections that would start after this many seconds (default 200)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(f"gpu_check.py needs a CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none. "
                 "`--dry-run` runs the bitsandbytes sections on the CPU to check the script itself.")
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)  # anything a library prints (Python or C) goes to stderr: stdout carries the JSON alone
    try:
        report = run(args)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
