"""The CLI's one-line errors print the message as written (brackets included)."""

from __future__ import annotations

import pytest
import typer

from edgeopt.errors import ConfigError


def test_an_error_line_keeps_its_square_brackets(capsys):
    from flows.cli import _fail

    message = "input 'image' has symbolic dims [batch, 3, height, width]: give --shape image=1x3x640x640"
    with pytest.raises(typer.Exit) as exc:
        _fail(ConfigError(message))
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err  # rich once read "[batch, 3, height, width]" as markup
    assert len(err.strip().splitlines()) == 1
