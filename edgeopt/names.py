"""User-given names that become MLflow names (experiments, registered models) or folder names.

A name is 1-100 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or digit, with no
``..``: no path separators, nothing that climbs out of a folder, nothing a shell or a URL must quote.
"""

from __future__ import annotations

import re

from edgeopt.errors import ConfigError

__all__ = ["ALLOWED", "MAX_LENGTH", "check_name", "profile_label", "safe_name"]

#: the allowed characters, as the error message names them
ALLOWED = "letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'"
MAX_LENGTH = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(value: str, *, what: str) -> str:
    """``value`` if it is a valid name, else ``ConfigError`` naming ``what``, the value and the allowed characters."""
    if not _NAME.fullmatch(value or "") or ".." in value or len(value) > MAX_LENGTH:
        raise ConfigError(f"{what} {value!r} is not a valid name: use {ALLOWED} "
                          f"(at most {MAX_LENGTH} characters)")
    return value


def safe_name(value: str) -> str:
    """``value`` with every disallowed character replaced by '-' (for names derived from file names)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", cleaned)).strip("-._")[:MAX_LENGTH]
    return cleaned or "model"


def profile_label(profile: str) -> str:
    """A profile as a run's name shows it: a built-in profile's name as given, a profile file by its stem
    (``/some/where/lab-x86.yaml`` -> ``lab-x86``), never a machine path."""
    text = str(profile)
    if "/" in text or "\\" in text or text.endswith((".yaml", ".yml")):
        text = re.split(r"[\\/]", text)[-1]
        text = re.sub(r"\.ya?ml$", "", text)
    return safe_name(text)
