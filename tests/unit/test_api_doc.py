"""Docs generated from the code: docs/api.md must equal what its generator prints now; the step diagram draws."""

import importlib
from pathlib import Path

import pytest

from pipelining_seq.tools import api_doc

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_api_md_is_up_to_date():
    expected = api_doc.render()
    assert API_MD.read_text() == expected, (
        "docs/api.md is out of date with the code: regenerate it with "
        "`python -m pipelining_seq.tools.api_doc > docs/api.md`"
    )


def test_api_md_covers_every_public_name():
    text = API_MD.read_text()
    for modname in api_doc.public_modules():
        module = importlib.import_module(modname)
        assert f"## `{modname}`" in text
        for name in module.__all__:
            assert f"### `{name}" in text, f"{modname}.{name} missing from docs/api.md"
    assert "| `run` |" in text and "| `plan` |" in text


@pytest.mark.slow
def test_step_diagram_draws(tmp_path):
    pytest.importorskip("matplotlib")
    from pipelining_seq.tools import diagrams

    out = diagrams.draw_step(tmp_path / "step.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
