"""The pytest plugin of the conformance run: ``python -m pytest -p pica_conformance.plugin ...``.

1. Imports pica (which registers PiCa with peft) and checks that the installed peft is the version whose
   test suite is being run (``--pica-peft-version``).
2. When a peft test module named in :mod:`.rows` is collected, extends its tables with the PiCa rows
   (:func:`.tables.extend_tables`) and its inline parametrize lists (:func:`.tables.extend_inline`), binds the
   PiCa tests of :mod:`.added` into their classes, and points the Hub model ids of ``test_decoder_models.py``
   at local stand-ins (:mod:`.standins`, ``--pica-standins``; :func:`.tables.replace_values`, test ids kept).
   The downloaded files are not edited. ``--pica-full``: every row and stand-in; default: the fast set.
3. Keeps only PiCa items (an added PiCa test, or an item whose parameters hold ``PiCaConfig``, a partial of
   it or a ``PiCaConfig`` instance);
   the others are deselected and counted per file as ``not_pica``. Applies :mod:`.expectations`.
4. Records every outcome and writes the JSON summary (``--pica-summary``); the run fails if any PiCa item
   failed or an expectation matched nothing.
"""

from __future__ import annotations

from pathlib import Path

import importlib
import platform
import sys
from collections.abc import Mapping
from typing import Any, Optional

import pytest

from . import expectations as expectations_module
from . import added
from .rows import inline_rows_for, tables_for
from .summary import Summary
from .tables import TableError, extend_inline, extend_tables, replace_values

_SUMMARY_KEY = pytest.StashKey[Summary]()
_OUTCOMES_KEY = pytest.StashKey[dict]()
_FILES_KEY = pytest.StashKey[dict]()  # node id -> stem of the peft test file it was collected from
_CONFIG: dict[str, pytest.Config] = {}
_STANDINS: dict[str, str] = {}  # Hub model id -> local stand-in (--pica-standins)
_MODEL_TABLES = {"test_decoder_models": "PEFT_DECODER_MODELS_TO_TEST"}  # module -> its table of Hub model ids
# The fast set runs the decoder tests on two architectures: GPT-2 (transformers Conv1D, fused c_attn) and Llama.
FAST_DECODER_MODELS = ("peft-internal-testing/tiny-random-GPT2LMHeadModel",
                       "trl-internal-testing/tiny-random-LlamaForCausalLM")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pica-conformance")
    group.addoption("--pica-summary", default=None, help="write the JSON summary here")
    group.addoption("--pica-command", default="", help="the command line recorded in the summary")
    group.addoption("--pica-peft-version", default=None, help="peft version of the downloaded test suite")
    group.addoption("--pica-full", action="store_true",
                    help="the full contract: every PiCa row and every stand-in model (default: the fast set)")
    group.addoption("--pica-standins", default=None,
                    help="directory of the local stand-ins for the Hub models of test_decoder_models.py (built if "
                         "missing)")


def pytest_configure(config: pytest.Config) -> None:
    import peft
    import pica

    expected_version = config.getoption("--pica-peft-version")
    if expected_version is not None and peft.__version__ != expected_version:
        raise pytest.UsageError(f"installed peft is {peft.__version__}, the test suite is peft {expected_version}")
    assert pica.PiCaConfig is not None  # registers PiCa with peft
    standins = config.getoption("--pica-standins")
    if standins is not None:
        from . import standins as standins_module

        _STANDINS.update(standins_module.build(standins))
    config.stash[_SUMMARY_KEY] = Summary()
    config.stash[_OUTCOMES_KEY] = {}
    config.stash[_FILES_KEY] = {}
    _CONFIG["config"] = config  # pytest_runtest_logreport gets no config argument


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    if isinstance(collector, pytest.Module):
        full = collector.config.getoption("--pica-full")
        required, derived = tables_for(collector.path.stem, full)
        if required or derived:
            try:
                module = collector.obj  # imports the module (cached; collect() reuses it)
            except Exception:  # noqa: BLE001 - the import error is reported by collect() itself
                module = None
            if module is not None:
                try:
                    extend_tables(module, required, derived)
                    for qualname, argnames, rows in inline_rows_for(collector.path.stem):
                        extend_inline(module, qualname, argnames, rows)
                    added.install(collector.path.stem, module)
                    added.extend_skip_helpers(module)
                    model_table = _MODEL_TABLES.get(collector.path.stem)
                    if model_table is not None:
                        if not _STANDINS:
                            raise TableError(f"{collector.path.name} names Hub models: pass --pica-standins DIR")
                        replace_values(module, model_table, _STANDINS, keep=None if full else FAST_DECODER_MODELS)
                except TableError as error:
                    raise pytest.UsageError(f"cannot add the PiCa rows: {error}") from error
    return (yield)


def is_pica_item(params: Mapping[str, Any], function: Any = None) -> bool:
    """True for a PiCa test added to a peft class, or if the item's parameters hold the PiCa config class, a
    ``functools.partial`` of it, or a PiCa config."""
    from pica import PiCaConfig

    if getattr(function, added.MARKER, False):
        return True
    return any(value is PiCaConfig or isinstance(value, PiCaConfig) or getattr(value, "func", None) is PiCaConfig
               for value in params.values())


def _params(item: pytest.Item) -> dict[str, Any]:
    callspec = getattr(item, "callspec", None)
    return dict(callspec.params) if callspec is not None else {}


def _test_name(item: pytest.Item) -> str:
    return getattr(item, "originalname", None) or item.name.split("[")[0]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    summary = config.stash[_SUMMARY_KEY]
    entries = expectations_module.EXPECTATIONS
    used: set[int] = set()
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        module = getattr(item, "module", None)  # peft's test module (an added test's code lives in added.py)
        file = module.__name__.rsplit(".", 1)[-1] if module is not None else item.path.stem
        params = _params(item)
        if not is_pica_item(params, getattr(item, "function", None)):
            summary.not_pica[file] += 1
            dropped.append(item)
            continue
        entry = expectations_module.match(file, _test_name(item), params, entries)
        if entry is not None:
            used.add(entries.index(entry))
            if entry.category == expectations_module.ENVIRONMENT:
                summary.deselect(file, item.nodeid, entry.category, entry.reason)
                dropped.append(item)
                continue
            item.add_marker(pytest.mark.xfail(strict=True, reason=f"[{entry.category}] {entry.reason}"))
        kept.append(item)
        config.stash[_FILES_KEY][item.nodeid] = file
    summary.unused_expectations = [
        {"file": entry.file, "test": entry.test, "rows": ", ".join(entry.rows), "reason": entry.reason}
        for index, entry in enumerate(entries) if index not in used
    ]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def _one_line(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, message)
        text = str(longrepr[2])
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(longrepr)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= 300 else line[:297] + "..."


def _outcome(report: pytest.TestReport) -> Optional[tuple[str, str]]:
    if hasattr(report, "wasxfail"):
        return ("xfailed", str(report.wasxfail)) if report.skipped else None
    if report.failed:
        text = str(report.longrepr)
        if text.startswith("[XPASS(strict)]"):
            return "xpassed_strict", "passed but is listed as expected to fail: " + text
        return ("failed" if report.when == "call" else "error"), _one_line(report)
    if report.skipped:
        return "skipped", _one_line(report)
    return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _CONFIG.get("config")
    if config is None:
        return
    pending = config.stash[_OUTCOMES_KEY]
    outcome = _outcome(report)
    if outcome is not None and report.nodeid not in pending:
        pending[report.nodeid] = outcome
    if report.when == "teardown":
        kind, reason = pending.pop(report.nodeid, ("passed", ""))
        # the peft test file the item was collected from (an added PiCa test is defined in added.py); the
        # report's path for an item not seen at collection
        file = config.stash[_FILES_KEY].get(report.nodeid) or Path(str(report.fspath or report.location[0])).stem

        config.stash[_SUMMARY_KEY].record(file, report.nodeid, kind, reason)


def _versions() -> dict[str, str]:
    """Versions of the imported packages (``__version__``: pica may run from a source tree on PYTHONPATH)."""
    found = {}
    for name in ("peft", "pica", "torch", "transformers", "pytest"):
        try:
            found[name] = str(importlib.import_module(name).__version__)
        except (ImportError, AttributeError):
            found[name] = "not installed"
    found["python"] = platform.python_version()
    found["python_executable"] = sys.executable
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    summary = config.stash[_SUMMARY_KEY]
    path = config.getoption("--pica-summary")
    if path:
        summary.write(path, config.getoption("--pica-command"), _versions(),
                      "full" if config.getoption("--pica-full") else "fast")
    if not summary.ok and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    summary = config.stash[_SUMMARY_KEY]
    write = terminalreporter.write_line
    terminalreporter.section("PiCa conformance")
    data = summary.to_json("", {})
    for file, row in data["per_file"].items():
        write(f"{file}: " + ", ".join(f"{key} {value}" for key, value in row.items() if value))
    for entry in data["failures"]:
        write(f"FAILED {entry['test']}: {entry['reason']}")
    for reason, count in data["expected_failures_by_reason"].items():
        write(f"expected ({count}): {reason}")
    for entry in summary.unused_expectations:
        write(f"UNUSED expectation {entry['file']}::{entry['test']} ({entry['rows']}): {entry['reason']}")
