"""Every setting is named once with its default; the README and compose say the same."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from config.settings import DEFAULTS, Reader, SettingsError

ROOT = Path(__file__).resolve().parents[2]


def readme_settings(document: str = "README.md", heading: str = "### Settings") -> dict[str, str]:
    """The settings table under ``heading`` in ``document``: name -> its default column."""
    table = (ROOT / document).read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            for name in re.findall(r"`([A-Z_]+)`", cells[0]):
                rows[name] = cells[1]
    return rows


DOCUMENTS = [("README.md", "### Settings"), ("docs/contract.md", "## 14. Settings")]


@pytest.mark.parametrize(("document", "heading"), DOCUMENTS)
def test_the_docs_list_every_setting_and_no_other(document: str, heading: str) -> None:
    assert set(readme_settings(document, heading)) == set(DEFAULTS)


@pytest.mark.parametrize(("document", "heading"), DOCUMENTS)
@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_the_docs_give_each_default_as_the_code_has_it(
    name: str, document: str, heading: str
) -> None:
    documented = readme_settings(document, heading)[name]
    default = DEFAULTS[name]
    if default is None:
        assert not re.match(r"^`[^`]*`", documented), f"{name}: README shows a default"
    else:
        assert f"`{default}`" in documented, f"{name}: README says {documented!r}"


def test_compose_passes_settings_through_without_defaults_of_its_own() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    written = re.findall(r"\$\{([A-Z_]+):-([^}]*)\}", compose)
    assert written, "compose passes settings through"
    assert [(name, value) for name, value in written if value] == []
    assert {name for name, _ in written} <= set(DEFAULTS)


def test_the_procfile_defaults_are_the_catalogue_s() -> None:
    procfile = (ROOT / "Procfile").read_text()
    for name, value in re.findall(r"\$\{([A-Z_]+):-([^}]*)\}", procfile):
        assert DEFAULTS[name] == value, name


def test_an_unset_setting_reads_as_its_default() -> None:
    reader = Reader({})
    assert reader.integer("OES_JWT_MAX_AGE", minimum=1) == int(DEFAULTS["OES_JWT_MAX_AGE"] or 0)
    assert reader.optional("OES_JWT_ISSUER") is None


def test_a_blank_setting_reads_as_its_default() -> None:
    assert Reader({"OES_LOCK_TTL": "  "}).number("OES_LOCK_TTL") == float(
        DEFAULTS["OES_LOCK_TTL"] or 0
    )


@pytest.mark.parametrize(
    ("read", "value"),
    [
        (Reader.port, "http"),
        (Reader.port, "70000"),
        (Reader.count, "0"),
        (Reader.http_url, "localhost:8000"),
    ],
)
def test_malformed_command_line_settings_are_refused_by_name(
    read: Callable[[Reader, str], object], value: str
) -> None:
    name = {"port": "PORT", "count": "WEB_CONCURRENCY", "http_url": "OES_GATEWAY_URL"}[
        read.__name__
    ]
    with pytest.raises(SettingsError, match=name):
        read(Reader({name: value}), name)


def test_a_setting_unknown_to_the_catalogue_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        Reader({}).text("OES_NO_SUCH_SETTING")
