"""docs/data.md documents every ts-data command and flag, in the command's own section."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from data_tools.cli import build_parser

DOCS = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_and_flag_is_documented_in_its_section():
    text = DOCS.read_text()
    # sections "### `ts-data NAME ...`" up to the next heading of the same or higher level
    sections = {
        m.group(1): text[m.end() : (n.start() if (n := re.compile(r"^#{1,3} ", re.M).search(
            text, m.end())) else len(text))]
        for m in re.finditer(r"^### `ts-data ([a-z-]+)[^`]*`", text, re.M)
    }  # fmt: skip
    for name, sub in _subcommands(build_parser()).items():
        assert name in sections, f"docs/data.md has no '### `ts-data {name} ...`' section"
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}" in sections[name], (
                        f"docs/data.md does not document `ts-data {name} {flag}`; add it to the "
                        f"table of its section"
                    )
        # and the other way round: every flag row of the section's table exists
        known = {f for a in sub._actions for f in a.option_strings}
        for flag in re.findall(r"^\| `(--[a-z-]+)`", sections[name], re.M):
            assert flag in known, f"docs/data.md documents `ts-data {name} {flag}`, which is gone"
