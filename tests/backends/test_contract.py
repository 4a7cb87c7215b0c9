"""Every registered backend honours the same contract (a new entry is covered automatically)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from edgeopt import backends
from edgeopt.backends.base import Backend, Recipe
from edgeopt.data import path_sha256
from edgeopt.errors import BackendUnavailable
from edgeopt.intake import assess


@pytest.mark.parametrize("name", backends.names())
def test_declares_its_identity(name):
    b = backends.get(name)
    assert isinstance(b, Backend) and b.name == name
    assert b.formats and b.devices and b.extra and b.requires
    assert issubclass(b.recipe_type, Recipe)
    undocumented = [f for f, info in b.recipe_type.model_fields.items() if not info.description]
    assert undocumented == []


@pytest.mark.parametrize("name", backends.names())
def test_recipe_validation_names_allowed_fields(name):
    rt = backends.recipe_type(name)
    rt.model_validate({})  # defaults are a valid recipe
    with pytest.raises(ValidationError) as info:
        rt.model_validate({"no_such_field": 1})
    assert "no_such_field" in str(info.value)


def _model_for(b: Backend, tiny, tiny_bert, request) -> tuple[str, dict[str, np.ndarray]]:
    """A model in a format the backend builds, and two samples of its inputs."""
    if "gguf" in b.formats or "llm" in b.model_kinds:  # language models: the tests' tiny Llama, two rows of ids
        llama = request.getfixturevalue("tiny_llama")
        path = llama["f16"] if "gguf" in b.formats else llama["hf"]
        return str(path), {"input_ids": np.arange(2 * 16).reshape(2, 16) % 1000 + 5}
    if "onnx" in b.formats:
        return str(tiny["model"]), {"input": np.load(tiny["eval"])["input"][:2]}
    assert "hf" in b.formats, f"no test model in {sorted(b.formats)}"
    data = np.load(tiny_bert["eval"])
    return str(tiny_bert["ckpt"]), {k: data[k][:2] for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.parametrize("name", backends.names())
def test_builds_and_loads_or_says_what_to_install(name, tiny, tiny_bert, tmp_path, request):
    b = backends.get(name)
    if not b.available():
        with pytest.raises(BackendUnavailable, match=rf"edgeopt\[{b.extra}\]"):
            b.check_available()
        pytest.skip(f"{name} is not installed here (extra '{b.extra}')")
    model, feeds = _model_for(b, tiny, tiny_bert, request)
    a = assess(model)
    art = b.optimize(model=a.model, assessment=a, recipe=b.recipe_type(), candidate="c", out_dir=tmp_path / "out")
    assert art.backend == name and art.parent_sha256 == a.model.sha256
    assert art.sha256 == path_sha256(art.path) and art.tool_versions
    session = b.load(path=art.path, runtime=art.runtime)
    (y, *_) = session.run({n: feeds[n] for n in session.input_names})
    assert y.shape[0] == 2 and np.isfinite(y).all()
    if "onnx" in b.formats:
        assert y.shape == (2, 4)
