"""The skeleton every stage script shares: a settings dataclass is the script's interface, and its parser follows.

    @dataclass
    class BenchmarkSettings:
        model: str = "tiny"
        batch_sizes: str = "1,4"
        repeats: int = 5

    def build_parser():
        p = cli.parser(__doc__)                                     # description + epilog from the docstring
        cli.add_settings(p, BenchmarkSettings, help={"batch_sizes": "comma-separated batch sizes"})
        return p

    main = cli.main_for(build_parser, BenchmarkSettings, benchmark)  # parse, set up logging, run(settings=...)
    if __name__ == "__main__":
        cli.run(main)                                               # one-line errors, exit codes (lmopt.errors)

One flag per field (`--batch-sizes` for `batch_sizes`): its type is the default's, a bool is a switch, a list
collects repeated flags, and the field's trailing comment is its help text. Arguments every script spells the same way get their help text here (COMMON_HELP). The
unified names: `--model`, `--artifacts`, `--device`, `--engine`, `--precision`, `--threads`, `--out`,
`--max-new-tokens` (tokens to generate, in-process or per served request), `--batch-sizes` (a sweep) /
`--batch-size` (one), `--repeats` (measured repetitions), `--warmup`, `--concurrency`; `-v/-q` for logging.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from dataclasses import MISSING, fields
from typing import Any, Callable, Sequence

from lmopt.errors import cli_main
from lmopt.log import add_verbosity_args, setup_logging

COMMON_HELP = {
    "model": "tiny (built-in), a preset, a local Hugging Face folder or a hub id",
    "artifacts": "artifacts root folder",
    "device": "cpu | cuda (or cuda:N)",
    "engine": "which engine runs the model (lmopt.engines.ENGINES)",
    "precision": "fp32 | fp16 | int8",
    "threads": "engine threads (0 = library default)",
    "out": "output file or folder (default: under the artifacts tree)",
    "max_new_tokens": "tokens to generate per request",
    "batch_sizes": "comma-separated batch sizes",
    "batch_size": "rows per batch",
    "repeats": "measured repetitions",
    "warmup": "warm-up repetitions before measuring (not recorded)",
    "concurrency": "comma-separated numbers of concurrent requests",
}


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first paragraph and whose epilog is the rest, verbatim."""
    doc = doc or ""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_comments(cls) -> dict[str, str]:
    """{field: its trailing comment} from the dataclass's source: the comment is the flag's help text."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^=]+=.*?\s{2,}#\s(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip().replace("%", "%%")  # argparse formats help with %
    return out


def add_settings(p: argparse.ArgumentParser, cls, help: dict[str, str] | None = None,
                 choices: dict[str, Sequence] | None = None, skip: Sequence[str] = (), verbosity: bool = True) -> None:
    """One flag per field of the dataclass `cls` (except `skip`), defaults from the dataclass; -v/-q unless
    verbosity=False. Help text: `help[field]`, else the field's trailing comment, else COMMON_HELP."""
    help, choices = {**field_comments(cls), **(help or {})}, choices or {}
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                              else None)
        kw: dict[str, Any] = {"help": help.get(f.name, COMMON_HELP.get(f.name))}
        if isinstance(default, bool) and default:   # a switch that is on by default: --x / --no-x
            kw.update(action=argparse.BooleanOptionalAction, default=True)
        elif isinstance(default, bool):
            kw["action"] = "store_true"
        elif isinstance(default, list):
            kw.update(action="append", default=None, metavar=f.name.upper().rstrip("S"))
        else:
            kw.update(default=default, type=type(default) if default is not None else str)
        if f.name in choices:
            kw["choices"] = choices[f.name]
        p.add_argument(flag(f.name), **kw)
    if verbosity:
        add_verbosity_args(p)


def settings_from(cls, args: argparse.Namespace):
    """The dataclass built from parsed arguments (fields the parser did not define keep their defaults; a list
    flag never given keeps its default)."""
    kw = {}
    for f in fields(cls):
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            if v is None and f.default_factory is not MISSING:
                continue
            kw[f.name] = v
    return cls(**kw)


def main_for(build_parser: Callable[[], argparse.ArgumentParser], cls, run: Callable[..., Any]) -> Callable:
    """The usual `main(argv) -> int`: parse, set up logging, call run(settings=...), exit 0."""
    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        setup_logging(args)
        run(settings=settings_from(cls, args))
        return 0

    return main


def parse(build_parser: Callable[[], argparse.ArgumentParser], cls, argv=None):
    """Parse and set up logging; return (settings, args) for mains that do more than one call."""
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return settings_from(cls, args), args


def run(main: Callable[[Sequence[str] | None], int]) -> None:
    """The script entry point: one-line errors for user mistakes, the exit code of main."""
    sys.exit(cli_main(main))
