from __future__ import annotations

import pytest

from edgeopt.errors import ConfigError
from edgeopt.names import check_name, profile_label, safe_name


@pytest.mark.parametrize("good", ["digits-resnet-intel-cpu", "m.v2_final", "A1"])
def test_good_names_pass(good):
    assert check_name(good, what="--model-name") == good


@pytest.mark.parametrize("bad", ["../../etc/x", "a/b", "a\\b", "..", "a..b", "", ".hidden", "with space", "x" * 101])
def test_bad_names_are_one_line_naming_the_allowed_characters(bad):
    with pytest.raises(ConfigError) as info:
        check_name(bad, what="--model-name")
    msg = str(info.value)
    assert "\n" not in msg and repr(bad) in msg and "letters, digits, '.', '_' and '-'" in msg


def test_default_names_are_made_safe():
    assert safe_name("my model (v2)-intel-cpu") == "my-model-v2-intel-cpu"
    assert check_name(safe_name("../x"), what="name") == "x"


def test_candidate_names_in_profiles_are_checked():
    from pydantic import ValidationError

    from edgeopt.profiles import CandidateConfig

    with pytest.raises(ValidationError, match="candidate name '../up' is not a valid name"):
        CandidateConfig(name="../up", backend="onnxruntime")


@pytest.mark.parametrize(("profile", "label"), [
    ("intel-cpu", "intel-cpu"),
    ("/some/where/lab-x86.yaml", "lab-x86"),
    ("profiles/arm64.yml", "arm64"),
    ("C:\\profiles\\edge box.yaml", "edge-box"),
])
def test_a_run_name_shows_a_profile_file_by_its_stem(profile, label):
    assert profile_label(profile) == label
