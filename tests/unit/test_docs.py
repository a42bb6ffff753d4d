"""Documentation that cannot drift: the generated config reference, the Dockerfile, links."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
DOCS = REPO / "docs"
OURS = ["quickstart.md", "own-trainer.md", "own-loop.md", "config.md", "failures.md", "troubleshooting.md",
        "workflows.md"]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_current():
    expected = load_generator().render()
    assert (DOCS / "config.md").read_text() == expected, \
        "docs/config.md is out of date: run python scripts/gen_config_docs.py and commit the result"


def test_every_shipped_config_key_and_run_flag_is_documented():
    text = (DOCS / "config.md").read_text()
    configs = [*(REPO / "configs").glob("*.yaml"), REPO / "examples" / "my_trainer.yaml"]
    for path in configs:
        for section, keys in yaml.safe_load(path.read_text()).items():
            if isinstance(keys, dict):
                missing = [k for k in keys if f"`{section}.{k}`" not in text]
                assert not missing, f"{path.name}: {section}.{missing} not in docs/config.md"
    from launcher.run import build_parser
    flags = [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")]
    assert flags and all(f"`{f}`" in text for f in flags)


def test_field_without_a_comment_is_refused(tmp_path, monkeypatch):
    gen = load_generator()
    src = tmp_path / "undocumented.py"
    src.write_text("from dataclasses import dataclass\n\n\n@dataclass\nclass Cfg:\n"
                   "    \"\"\"Doc.\"\"\"\n\n    ok: int = 1  # described\n    bare: int = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import undocumented
    assert gen.field_comments(undocumented.Cfg) == {"ok": "described", "bare": ""}
    try:
        gen.section_table("x", undocumented.Cfg)
    except SystemExit as e:
        assert "bare" in str(e) and "comment" in str(e)
    else:
        raise AssertionError("a field without a comment was accepted")


# ----------------------------------------------------------------------------- Dockerfile

def shell_commands(text: str) -> list[str]:
    """Simple commands of a shell snippet: split at ``&&``, ``||``, ``;`` and newlines, comments dropped."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "&", "|"):
                if words:
                    out.append(" ".join(words))
                words = []
            else:
                words.append(token)
    return out


def dockerfile_runs(text: str) -> list[str]:
    """Commands of every RUN instruction (shell or exec form), continuation lines joined."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    runs = []
    for line in joined.splitlines():
        m = re.match(r"\s*RUN\s+(.*)", line, re.IGNORECASE)
        if not m:
            continue
        body = m.group(1).strip()
        if body.startswith("["):
            runs.append(" ".join(json.loads(body)))
        else:
            runs += shell_commands(body)
    return runs


def readme_setup_commands(text: str) -> set[str]:
    """Commands the README's set-up section tells a user to run: in its code blocks and inline."""
    m = re.search(r"^## [^\n]*set-?up[^\n]*\n(.*?)(?=^## )", text, re.IGNORECASE | re.MULTILINE | re.DOTALL)
    assert m, "README.md has no '## ...Set-up...' section"
    section = m.group(1)
    found = []
    for block in re.findall(r"```(?!text|console)[a-z]*\n(.*?)```", section, re.DOTALL):  # not sample output
        found += shell_commands(block)
    found += [c for c in re.findall(r"`([^`\n]+)`", section) if c.startswith(("bash ", "python", ".venv/"))]
    return set(found)


def test_dockerfile_runs_only_what_the_readme_setup_runs():
    docker = (REPO / "Dockerfile").read_text()
    runs = dockerfile_runs(docker)
    assert runs, "the Dockerfile runs nothing"
    allowed = readme_setup_commands((REPO / "README.md").read_text())
    extra = [c for c in runs if c not in allowed]
    assert not extra, f"Dockerfile RUNs {extra}, which the README's set-up does not run ({sorted(allowed)})"
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", docker, re.MULTILINE), "the default image must be the CPU one"
    assert "ftrun" in docker and "torchrun" in docker


def test_command_parsers_see_through_shell_syntax():
    assert shell_commands("a && b; c || d  # note\n e 'x y'") == ["a", "b", "c", "d", "e x y"]
    docker = "FROM x\nRUN a \\\n  --flag && b\n# RUN no\nRUN [\"c\", \"d\"]\n"
    assert dockerfile_runs(docker) == ["a --flag", "b", "c d"]


# ----------------------------------------------------------------------------- links

def test_links_in_our_docs_resolve():
    broken = []
    for name in OURS:
        text = (DOCS / name).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            if not (DOCS / target).exists():
                broken.append(f"{name} -> {target}")
    assert not broken, f"broken links: {broken}"
