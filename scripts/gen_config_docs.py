"""Generate docs/config.md from the config dataclasses and launcher/run.py's parser.

Usage::

    python scripts/gen_config_docs.py           # rewrite docs/config.md
    python scripts/gen_config_docs.py --check   # exit 1 if docs/config.md is out of date

Every field's description is the comment on the same line as the field in its dataclass,
read with ``tokenize``, so the reference cannot drift from the code; a field without a
comment is an error. ``tests/unit/test_docs.py`` fails when the committed file is stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher import config as cfg_mod  # noqa: E402
from launcher import run as run_mod  # noqa: E402
from trainers import BUILTIN, resolve_trainer  # noqa: E402

OUT = REPO / "docs" / "config.md"
#: Trainers documented besides the built-in ones, as ``(name in YAML, what it is)``.
EXAMPLES = [("examples.my_trainer:MyTrainer", "the example of a user-defined trainer (docs/own-trainer.md)")]


def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the comments on the same line as each field of ``cls``."""
    module = sys.modules[cls.__module__]
    source = inspect.getsource(module)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out[stmt.target.id] = comments.get(stmt.end_lineno, "")
    return out


def field_types(cls: type) -> dict[str, str]:
    """``{field: annotation as written}``."""
    tree = ast.parse(inspect.getsource(sys.modules[cls.__module__]))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    return {s.target.id: ast.unparse(s.annotation) for s in node.body
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '""' if v == "" else v
    return repr(v)


def section_table(section: str, cls: type, shape: tuple[str, ...] = ()) -> list[str]:
    """A markdown table of one config section."""
    comments, types = field_comments(cls), field_types(cls)
    spelled = {v: k for k, v in cfg_mod._ALIASES.items()}
    missing = [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)]
    if missing:
        raise SystemExit(f"{cls.__module__}.{cls.__qualname__}: field(s) {', '.join(missing)} have no comment on "
                         f"their line; add a one-line '# what it does' comment (it becomes the documentation)")
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    lines = [f"### `{section}`", "", f"{doc} (`{cls.__module__}.{cls.__qualname__}`)", "",
             "| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        key = f"{section}.{spelled.get(f.name, f.name)}"
        note = comments[f.name]
        if any(key == s or key.startswith(s) for s in shape):
            note += " *(defines tensor shapes: changing it on resume is refused)*"
        lines.append(f"| `{key}` | {_cell(types[f.name])} | `{_cell(_yaml_value(_default(f)))}` | {_cell(note)} |")
    return lines + [""]


def cli_table(parser: argparse.ArgumentParser, positionals: bool = False) -> list[str]:
    """Every flag (and, with ``positionals``, every positional argument) of ``parser``."""
    lines = [f"| {'argument' if positionals else 'flag'} | value | default | description |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) and positionals:
            continue
        if not action.option_strings:
            if positionals:
                lines.append(f"| `{action.metavar or action.dest.upper()}` |  |  | {_cell(action.help)} |")
            continue
        flags = ", ".join(f"`{o}`" for o in action.option_strings)
        value = "" if action.nargs == 0 else f"`{action.metavar or action.dest.upper()}`"
        if action.choices:
            value = " / ".join(f"`{c}`" for c in action.choices)
        default = "(required)" if action.required else ("" if action.default in (None, False, [], argparse.SUPPRESS)
                                                         else f"`{action.default}`")
        lines.append(f"| {flags} | {value} | {default} | {_cell(action.help)} |")
    return lines + [""]


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_docs.py from the config dataclasses and launcher/run.py; "
        "do not edit by hand. Regenerate: python scripts/gen_config_docs.py -->",
        "",
        "A run is configured by one YAML file (`--config`) with a `trainer:` line and one mapping per",
        "section. Precedence: command line (`--set section.key=value`, repeatable) over the file, over",
        "the defaults below. Every problem in a file is reported at once, each naming the key, the value",
        "found and what was expected. The config a run used is saved in `RUN_DIR/config.yaml` and with",
        "every checkpoint; on resume the two are compared: changes are listed in the log, and a change to",
        "a key marked *defines tensor shapes* is refused.",
        "",
        "## Command line: `launcher/run.py`",
        "",
        "`python launcher/run.py FLAGS` (one process) or `torchrun ... launcher/run.py FLAGS` / "
        "`ftrun ... launcher/run.py FLAGS` (see [agent.md](agent.md) for the agent's own flags).",
        "",
        *cli_table(run_mod.build_parser()),
        "## Top level",
        "",
        "| key | description |",
        "|---|---|",
        "| `trainer` | " + _cell(field_comments(cfg_mod.RunConfig)["trainer"]) + " |",
        "",
        "## Sections of every trainer",
        "",
        *section_table("train", cfg_mod.TrainConfig),
        *section_table("checkpoint", cfg_mod.CheckpointConfig),
        *section_table("dist", cfg_mod.DistConfig),
    ]
    trainers = [(name, f"built-in trainer `{name}`") for name in BUILTIN] + EXAMPLES
    for name, what in trainers:
        cls = resolve_trainer(name)
        shape = tuple(getattr(cls, "shape_fields", ("model.",)))
        metric, mode = getattr(cls, "best", ("val_loss", "min"))
        out += [f"## Trainer `{name}`", "",
                f"Sections owned by {what} (`{cls.__module__}.{cls.__name__}`). The best checkpoint is chosen "
                f"by `{metric}` ({mode}) unless `checkpoint.best_metric` / `checkpoint.best_mode` say otherwise.",
                ""]
        for section, section_cls in cls.config_sections.items():
            out += section_table(section, section_cls, shape)
    return "\n".join(out + tools_section()).rstrip() + "\n"


def tools_section() -> list[str]:
    """Every subcommand of the checkpoint tools (``python -m launcher.ckpt``) and its arguments."""
    from launcher import ckpt

    out = ["## Command line: `python -m launcher.ckpt` (checkpoint tools)", "",
           "Also installed as `ftlaunch-ckpt`; see [checkpoints.md](checkpoints.md) for the format they read.", ""]
    sub = next(a for a in ckpt.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        out += [f"### `{name}`", "", _cell(parser.description or ""), "", *cli_table(parser, positionals=True)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is out of date; write nothing")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT.relative_to(REPO)} is out of date: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
