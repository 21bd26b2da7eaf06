"""PiCa adapters across CPU kernel choices: save under one setting, load under every other one.

A user's machine picks other CPU kernels than ours: torch's vectorised ATen kernels
(``ATEN_CPU_CAPABILITY``), oneDNN's instruction set for bf16 matmuls (``ONEDNN_MAX_CPU_ISA``) and oneMKL's
code path for fp32/fp64 BLAS and LAPACK (``MKL_ENABLE_INSTRUCTIONS``, ``MKL_CBWR``). These are read once,
when torch loads, so each setting runs in its own process. Every process (one per setting, all at once):

1. records ``torch.backends.cpu.get_cpu_capability()`` (a request above the host's silently falls back),
   the oneMKL and oneDNN code paths their verbose modes name, and a few probe computations (ATen
   reductions and transcendental functions, ``randn``, fp32/fp64 GEMM, eigensolvers, a bf16 linear, PiCa's
   projector), so the table shows which knob really changes a computation on this host;
2. builds the same base (weights and ``M`` read from one file written by the parent, so no random kernel is
   involved) in fp32 and in bf16, adapts it with ``projector_storage="full"`` and ``"compact"``, and saves
   the four adapters with their logits and projectors;
3. waits until every process has saved, then loads every saved adapter (all settings, 4 cases each) onto a
   fresh base and compares its logits and ``P`` with those of the process that saved it.

So ``n`` settings cost ``n`` process starts for the whole ``n × n`` matrix. Output: one JSON object (the
command, the host, per setting the capability, probe differences, projector and logits differences from
the host's defaults, and one row per save setting × load setting × dtype × storage). ``--markdown`` also
writes the tables as markdown.

    PYTHONPATH=src python benchmarks/cpu_kernels.py --out benchmarks/results/cpu_kernels.json \\
        --markdown docs/cpu_kernels.md
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KNOBS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
         "MKL_DEBUG_CPU_TYPE")
"""Variables that choose CPU kernels; removed from the inherited environment so "host" means the defaults."""

SETTINGS: dict[str, dict[str, str]] = {
    "host": {},
    "aten=default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten=avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "onednn=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "mkl=SSE4_2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "mkl=AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "mkl_cbwr=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "oldest": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
               "MKL_CBWR": "COMPATIBLE"},
    # Only in the full benchmark run (not the test):
    "onednn=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "onednn=AVX512_CORE": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "mkl=AVX512": {"MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "mkl_cbwr=AVX2": {"MKL_CBWR": "AVX2"},
}
TEST_SETTINGS = ("host", "aten=default", "aten=avx2", "aten=avx512", "onednn=AVX2", "mkl=SSE4_2", "mkl=AVX2",
                 "mkl_cbwr=COMPATIBLE", "oldest")
"""The nine settings the test runs (each knob and all of them at their lowest together)."""

CASES = (("float32", "full"), ("float32", "compact"), ("bfloat16", "full"), ("bfloat16", "compact"))
RANK = 4
MODEL = dict(hidden_size=64, intermediate_size=512)
"""tests/conftest.py's tiny Llama, wider: P (rank 4 of 64 or 512 inputs) takes the fp32 Gram route, and the bf16
down projection sums 512 products, enough for another accumulation order to move some bf16 outputs."""
INPUT_SHAPE = (4, 16)

_PROBE_SIZE = (257, 263, 129)


def _llama_config():
    from tests.conftest import llama_config

    return llama_config(**MODEL)


def _hashed(shape: tuple[int, ...], salt: int):
    """Values in [-0.5, 0.5) from integer arithmetic and one exact division: the same under any kernel."""
    import torch

    count = 1
    for size in shape:
        count *= size
    codes = (torch.arange(count, dtype=torch.int64) * 2654435761 + salt * 40503) % 1_000_003
    return (codes.double() / 1_000_003 - 0.5).float().reshape(shape)


# --------------------------------------------------------------------------------------------- worker


def _capture_stdout(function: Callable[[], None]) -> str:
    """What C code writes to file descriptor 1 while ``function`` runs (MKL and oneDNN verbose lines)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            function()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        return sink.read().decode(errors="replace")


def _code_paths() -> dict[str, str]:
    """oneMKL's target line and the oneDNN implementation of a bf16 linear ("" if oneDNN is not used)."""
    import torch

    def mkl() -> None:
        with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
            torch.ones(8, 8) @ torch.ones(8, 8)

    def onednn() -> None:
        left, right = _hashed(_PROBE_SIZE[:2], 1).bfloat16(), _hashed(_PROBE_SIZE[1:], 2).T.contiguous().bfloat16()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            torch.nn.functional.linear(left, right)

    mkl_lines = _capture_stdout(mkl).splitlines()
    header = next((line for line in mkl_lines if "oneMKL" in line or "Intel(R) MKL" in line), "")
    conditional = next((part for line in mkl_lines for part in line.split() if part.startswith("CNR:")), "")
    onednn_lines = _capture_stdout(onednn).splitlines()
    implementation = next((line.split(",matmul,", 1)[1].split(",")[0] for line in onednn_lines
                           if ",exec,cpu,matmul," in line), "")
    return {"mkl_target": header.split(" for ", 1)[-1].split(",")[0].strip(), "mkl_cbwr": conditional,
            "onednn_bf16_linear": implementation}


def _probes() -> dict[str, Any]:
    """Small computations that each go through one kernel family (inputs independent of every kernel)."""
    import torch

    from pica.projector import top_right_singular_vectors

    vector = _hashed((100_000,), 0) * 8  # (100000,)
    left, right = _hashed(_PROBE_SIZE[:2], 1), _hashed(_PROBE_SIZE[1:], 2)  # (257, 263), (263, 129)
    symmetric = left.double().T @ left.double()  # (263, 263); fp64 GEMM is exact enough to be kernel-free here
    symmetric = ((symmetric + symmetric.T) / 2).round(decimals=6)
    return {
        "aten_sum": vector.sum().reshape(1),
        "aten_exp": vector.exp(),
        "aten_tanh": vector.tanh(),
        "aten_softmax": vector.reshape(1000, 100).softmax(dim=-1),
        "aten_randn": torch.randn(1000, generator=torch.Generator().manual_seed(1)),
        "sgemm_fp32": left @ right,
        "dgemm_fp64": left.double() @ right.double(),
        "eigh_fp32": torch.linalg.eigh(symmetric.float()).eigenvalues,
        "eigh_fp64": torch.linalg.eigh(symmetric).eigenvalues,
        "linear_bf16": torch.nn.functional.linear(left.bfloat16(), right.T.contiguous().bfloat16()).float(),
        "pica_projector": top_right_singular_vectors(_hashed((96, 160), 3), 8),
    }


def _peft_model(fixtures: dict, dtype_name: str, storage: str):
    import torch
    from peft import get_peft_model

    from pica import PiCaConfig

    model = get_peft_model(_base_model(fixtures, dtype_name), PiCaConfig(rank=RANK, projector_storage=storage))
    with torch.no_grad():
        for name, update in model.named_parameters():
            if ".pica_M." in name:
                update.copy_(fixtures[f"M:{name}"])
    return model.eval()


def _base_model(fixtures: dict, dtype_name: str):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_llama_config())
    model.load_state_dict({key[len("base:"):]: value for key, value in fixtures.items() if key.startswith("base:")})
    return model.to(getattr(torch, dtype_name)).eval()


def _logits(model, fixtures: dict):
    import torch

    with torch.no_grad():
        return model(input_ids=fixtures["input_ids"]).logits.float()


def _projectors(model) -> dict[str, Any]:
    from pica.tuner.layer import pica_layers

    return {name: layer.pica_P["default"].detach().float().clone() for name, layer in pica_layers(model, "default")}


def _compare(reference: dict, logits, projectors: dict) -> dict[str, Any]:
    expected = reference["logits"]
    delta = float((logits - expected).abs().max())
    flips, largest = 0, 0.0
    for name, projector in projectors.items():
        saved = reference[f"P:{name}"]
        flips += int(((projector * saved).sum(dim=1) < 0).sum())
        largest = max(largest, float((projector - saved).abs().max()))
    return {"max_abs_dlogit": delta, "rel_dlogit": delta / float(expected.abs().max()), "sign_flips": flips,
            "max_abs_dP": largest, "layers": len(projectors)}


def worker(setting: str, workdir: Path) -> int:
    """One setting's process: probes and saves, then (after "load" on stdin) every load. See the module doc."""
    import logging

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    fixtures = load_file(workdir / "fixtures.safetensors")
    info = {"setting": setting, "env": SETTINGS[setting], "capability": torch.backends.cpu.get_cpu_capability(),
            **_code_paths()}
    save_file({k: v.contiguous() for k, v in _probes().items()}, workdir / "probes" / f"{setting}.safetensors")
    info["adapter_effect"] = {}
    for dtype_name, storage in CASES:
        model = _peft_model(fixtures, dtype_name, storage)
        target = workdir / "adapters" / setting / f"{dtype_name}-{storage}"
        model.save_pretrained(target)
        reference = {"logits": _logits(model, fixtures)} | {f"P:{k}": v for k, v in _projectors(model).items()}
        save_file(reference, target / "reference.safetensors")
        with model.disable_adapter():
            base_logits = _logits(model, fixtures)
        info["adapter_effect"][f"{dtype_name}-{storage}"] = float(
            (reference["logits"] - base_logits).abs().max() / reference["logits"].abs().max())
    (workdir / "info" / f"{setting}.json").write_text(json.dumps(info))
    print("saved", flush=True)
    if sys.stdin.readline().strip() != "load":
        return 1
    rows = []
    for saved_dir in sorted((workdir / "adapters").iterdir()):
        for dtype_name, storage in CASES:
            source = saved_dir / f"{dtype_name}-{storage}"
            row = {"save": saved_dir.name, "load": setting, "dtype": dtype_name, "storage": storage}
            try:
                reference = load_file(source / "reference.safetensors")
                model = PeftModel.from_pretrained(_base_model(fixtures, dtype_name), source).eval()
                row |= _compare(reference, _logits(model, fixtures), _projectors(model))
            except Exception as error:  # a refused or failed load is a result of the table, not a crash
                row["error"] = f"{type(error).__name__}: {error}"[:500]
            rows.append(row)
    (workdir / "rows" / f"{setting}.json").write_text(json.dumps(rows))
    return 0


# ----------------------------------------------------------------------------------------------- parent


def _write_fixtures(workdir: Path) -> None:
    """Base weights (fp32), one random M per group and the inputs, in one file every process reads."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from pica import PiCaConfig

    torch.manual_seed(0)
    base = LlamaForCausalLM(_llama_config()).eval()
    tensors = {f"base:{k}": v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    model = get_peft_model(base, PiCaConfig(rank=RANK))
    generator = torch.Generator().manual_seed(4)
    for name, update in model.named_parameters():
        if ".pica_M." in name:
            tensors[f"M:{name}"] = torch.randn(update.shape, generator=generator) * 0.5  # (out, rank)
    tensors["input_ids"] = torch.randint(1, 96, INPUT_SHAPE, generator=generator)
    save_file(tensors, workdir / "fixtures.safetensors")


def _host_cpu() -> dict[str, Any]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", ""), "vendor": fields.get("vendor_id", ""),
            "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"})}


def _differences(first: dict, second: dict) -> dict[str, float]:
    """Largest absolute difference per probe, only where the two are not bitwise equal."""
    import torch

    return {key: float((first[key].double() - second[key].double()).abs().max())
            for key in first if not torch.equal(first[key], second[key])}


def _no_effect_reason(setting: str, info: dict, host: dict, cpu: dict) -> str | None:
    """Why a setting that changed no probe cannot change one on this host (None if no such reason)."""
    env = SETTINGS[setting]
    reasons = []
    for key, value in env.items():
        if key == "ATEN_CPU_CAPABILITY" and info["capability"] == host["capability"]:
            reasons.append(f"{key}={value} gives the host's own capability {host['capability']}")
        elif (key == "MKL_ENABLE_INSTRUCTIONS" and cpu["vendor"] != "GenuineIntel"
              and info["mkl_target"] == host["mkl_target"]):
            reasons.append(f"{key}={value}: on this {cpu['vendor']} CPU oneMKL reports the same generic target "
                           f"('{info['mkl_target']}') with and without it, and computed bitwise the same")
        elif key == "ONEDNN_MAX_CPU_ISA" and info["onednn_bf16_linear"] == host["onednn_bf16_linear"]:
            reasons.append(f"{key}={value}: oneDNN still chose {info['onednn_bf16_linear'] or 'nothing'}")
        else:
            return None
    return "; ".join(reasons) if reasons else None


def run(settings: tuple[str, ...], workdir: Path, timeout: float = 600.0) -> dict[str, Any]:
    """Run one process per setting (all at once) and gather the table. See the module docstring."""
    import torch
    from safetensors.torch import load_file

    for folder in ("adapters", "probes", "info", "rows", "logs"):
        (workdir / folder).mkdir(parents=True, exist_ok=True)
    _write_fixtures(workdir)
    base_env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    base_env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    processes = {}
    for setting in settings:
        log = open(workdir / "logs" / f"{setting}.log", "w")
        processes[setting] = (subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", setting, "--workdir", str(workdir)],
            env=base_env | SETTINGS[setting], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            cwd=ROOT), log)
    failed = {}
    for setting, (process, _) in processes.items():
        if process.stdout.readline().strip() != "saved":
            failed[setting] = "did not save"
    for setting, (process, log) in processes.items():
        try:
            process.communicate("load\n", timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except (subprocess.TimeoutExpired, BrokenPipeError):
            process.kill()
            process.communicate()
        log.close()
        if process.returncode != 0 and setting not in failed:
            failed[setting] = f"exit status {process.returncode}"
    for setting in failed:
        failed[setting] += ": " + (workdir / "logs" / f"{setting}.log").read_text()[-2000:]
    elapsed = time.perf_counter() - start

    cpu = _host_cpu()
    done = [s for s in settings if s not in failed]
    infos = {s: json.loads((workdir / "info" / f"{s}.json").read_text()) for s in done}
    probes = {s: load_file(workdir / "probes" / f"{s}.safetensors") for s in done}
    references = {(s, d): load_file(workdir / "adapters" / s / f"{d}-full" / "reference.safetensors")
                  for s in done for d in ("float32", "bfloat16")}
    rows = [row for s in done for row in json.loads((workdir / "rows" / f"{s}.json").read_text())]
    table_settings = []
    host = "host" if "host" in done else None
    for setting in done:
        entry = dict(infos[setting])
        if host is not None:
            changed = _differences(probes[host], probes[setting])
            entry["changed_probes"] = changed
            entry["changes_computation"] = bool(changed)
            entry["no_effect_reason"] = None if changed else _no_effect_reason(setting, entry, infos[host], cpu)
            for dtype_name in ("float32", "bfloat16"):
                mine, theirs = references[(setting, dtype_name)], references[(host, dtype_name)]
                projector_keys = [k for k in mine if k.startswith("P:")]
                entry[f"vs_host_{dtype_name}"] = {
                    "max_abs_dlogit": float((mine["logits"] - theirs["logits"]).abs().max()),
                    "max_abs_dP": max(float((mine[k] - theirs[k]).abs().max()) for k in projector_keys),
                    "sign_flips": sum(int(((mine[k] * theirs[k]).sum(dim=1) < 0).sum()) for k in projector_keys),
                }
        table_settings.append(entry)
    worst = {}
    for dtype_name, storage in CASES:
        selected = [r for r in rows if r["dtype"] == dtype_name and r["storage"] == storage and "error" not in r]
        if selected:
            worst[f"{dtype_name}-{storage}"] = {
                key: max(r[key] for r in selected) for key in ("max_abs_dlogit", "rel_dlogit", "max_abs_dP")
            } | {"sign_flips": sum(r["sign_flips"] for r in selected), "loads": len(selected)}
    return {
        "benchmark": "cpu_kernels",
        "host": cpu | {"torch": torch.__version__, "torch_capability": torch.backends.cpu.get_cpu_capability()},
        "model": {"llama_config": MODEL, "rank": RANK, "cases": [f"{d}-{s}" for d, s in CASES]},
        "seconds": round(elapsed, 1),
        "failed": failed,
        "settings": table_settings,
        "worst": worst,
        "errors": [r for r in rows if "error" in r],
        "loads": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    """The settings table and one save × load matrix of max |Δ logit| per case."""
    lines = [f"Command: `{result['command']}`  ",
             f"Host: {result['host']['model']} ({result['host']['vendor']}; {', '.join(result['host']['flags'])}), "
             f"torch {result['host']['torch']}; {len(result['settings'])} settings in {result['seconds']} s.", "",
             "| setting | variables | capability | oneMKL CNR | oneDNN bf16 linear | probes changed vs host "
             "(max abs diff) | fp32 P vs host: flips / max abs ΔP | bf16 P vs host: flips / max abs ΔP "
             "| fp32 / bf16 logits vs host |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in result["settings"]:
        variables = " ".join(f"`{k}={v}`" for k, v in entry["env"].items()) or "(none)"
        changed = ", ".join(f"{k} {v:.2g}" for k, v in entry.get("changed_probes", {}).items())
        if not changed:
            changed = "none" + (f": {entry['no_effect_reason']}" if entry.get("no_effect_reason") else "")
        fp32, bf16 = entry.get("vs_host_float32", {}), entry.get("vs_host_bfloat16", {})
        lines.append(f"| {entry['setting']} | {variables} | {entry['capability']} | {entry['mkl_cbwr']} | "
                     f"{entry['onednn_bf16_linear'] or '(oneDNN not used)'} | {changed} | "
                     f"{fp32.get('sign_flips')} / {fp32.get('max_abs_dP', 0):.2g} | "
                     f"{bf16.get('sign_flips')} / {bf16.get('max_abs_dP', 0):.2g} | "
                     f"{fp32.get('max_abs_dlogit', 0):.2g} / {bf16.get('max_abs_dlogit', 0):.2g} |")
    lines += ["", "Worst over every save setting × load setting:", "",
              "| case | loads | max abs Δ logit | max relative Δ logit | P sign flips | max abs ΔP |",
              "|---|---|---|---|---|---|"]
    for case, values in result["worst"].items():
        lines.append(f"| {case} | {values['loads']} | {values['max_abs_dlogit']:.3g} | {values['rel_dlogit']:.3g} | "
                     f"{values['sign_flips']} | {values['max_abs_dP']:.3g} |")
    names = [entry["setting"] for entry in result["settings"]]
    for dtype_name, storage in CASES:
        cells = {(r["save"], r["load"]): r for r in result["loads"]
                 if r["dtype"] == dtype_name and r["storage"] == storage}
        lines += ["", f"max abs Δ logit, {dtype_name}, projector_storage={storage!r} (rows: saved under; columns: "
                      "loaded under; sign flips of P: "
                      f"{sum(r.get('sign_flips', 0) for r in cells.values())} in all):", "",
                  "| saved \\ loaded | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for save in names:
            values = []
            for load in names:
                row = cells.get((save, load), {})
                values.append("error" if "error" in row else (f"{row['max_abs_dlogit']:.2g}" if row else "-"))
            lines.append(f"| {save} | " + " | ".join(values) + " |")
    if result["errors"] or result["failed"]:
        lines += ["", f"Errors: {json.dumps(result['errors'])[:2000]} Failed: {json.dumps(result['failed'])[:2000]}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="all", help="'all', 'test' or comma-separated names of SETTINGS")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the markdown tables here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        # The workers never use bitsandbytes; peft imports it when installed, which costs ~1 s of CPU per process
        # and, on AVX512-BF16 CPUs with the ``kernels`` package installed, a Hub lookup (docs/quantized.md, "The kernels package").
        sys.modules.setdefault("bitsandbytes", None)
        return worker(args.worker, args.workdir)
    names = {"all": tuple(SETTINGS), "test": TEST_SETTINGS}.get(args.settings) or tuple(args.settings.split(","))
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {sorted(SETTINGS)}")
    with tempfile.TemporaryDirectory(prefix="pica-cpu-kernels-") as workdir:
        result = {"command": " ".join(shlex.quote(a) for a in ["python", *sys.argv])} | run(names, Path(workdir))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(result))
    return 1 if result["failed"] or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
