"""The documentation: docs/config.md generated from the config dataclasses' docstrings and
kept current; the README a short manual; measurements with their command, date and machine."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from raypath import config
from raypath.configdoc import markdown, parse_docstring

ROOT = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_up_to_date():
    assert (ROOT / "docs" / "config.md").read_text() == markdown(), (
        "docs/config.md is out of date: run `python -m raypath.configdoc > docs/config.md`")


def test_every_field_is_documented():
    text = markdown()
    for cls in (config.Config, config.ModelConfig, config.DataConfig, config.TrainConfig, config.BranchConfig,
                config.ClusterConfig, config.SweepConfig, config.TrackingConfig, config.CompareConfig):
        _, docs = parse_docstring(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.type) and f.name not in ("model", "data", "train", "branch",
                                                                        "cluster", "sweep", "tracking", "compare"):
                assert docs.get(f.name), f"{cls.__name__}.{f.name}"
                assert f"{f.name}` |" in text


def test_an_undocumented_field_fails_the_generator():
    @dataclasses.dataclass
    class Partial:
        """Two fields, one documented.

        a: documented.
        """

        a: int = 1
        b: int = 2

    from raypath.configdoc import _table

    with pytest.raises(ValueError, match="Partial.b: not documented"):
        _table(Partial, "")


# --------------------------------------------------------------------------- README and docs

README = ROOT / "README.md"
#: Words of a development diary, not of a manual or a measurement record.
DIARY = re.compile(r"\bsession \d|\bsessions \d|the issue|this version fixes|\bwe fixed\b", re.IGNORECASE)


def test_readme_is_a_short_manual():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for name in ("run", "status", "cost", "compare", "sweep", "law fit", "law predict"):
        assert f"raypath {name}" in text, f"README does not show `raypath {name}`"
    for path in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / path).exists(), f"README links to {path}, which does not exist"


def test_cli_commands_are_all_in_the_readme():
    from raypath.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= {w for w in re.findall(r"raypath (\w+)", README.read_text())}


@pytest.mark.parametrize("path", ["README.md", "docs/results.md", "docs/benchmarks.md", "docs/config.md",
                                  "k8s/README.md"])
def test_docs_do_not_narrate_development(path):
    hits = [line for line in (ROOT / path).read_text().splitlines() if DIARY.search(line)]
    assert hits == []


@pytest.mark.parametrize("path", ["docs/results.md", "docs/benchmarks.md"])
def test_every_measurement_names_command_date_and_machine(path):
    sections = re.split(r"^## ", (ROOT / path).read_text(), flags=re.MULTILINE)[1:]
    assert sections
    for section in sections:
        title = section.splitlines()[0]
        for key in ("- Command:", "- Date:", "- Machine:"):
            assert key in section, f"{path}: {title!r} lacks {key}"
