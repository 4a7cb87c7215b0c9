"""One exception tree for edgeopt.

Every error a user can cause carries a one-line message that names the problem and what to do::

    EdgeOptError                 base class; ``str(err)`` is the one line shown to the user
    ├── ConfigError              a profile or recipe is wrong (unknown key, bad type, unknown backend)
    ├── ModelError               the model file is missing, not of its format, corrupt or unsupported
    ├── DataError                calibration / evaluation data is missing, mismatched or not finite
    ├── BackendUnavailable       a toolchain's optional dependency is not installed (names the extra)
    ├── RegistryError            a registered model, version or alias is missing, its files are gone or
    │                            changed, or a lifecycle step's precondition does not hold (approve, rollback)
    └── CandidateFailed          building or measuring one candidate failed; carries a classified reason

``CandidateFailed.reason`` is one of ``FAILURE_REASONS``; a flow records it and goes on.
"""

from __future__ import annotations

__all__ = [
    "FAILURE_REASONS",
    "BackendUnavailable",
    "CandidateFailed",
    "ConfigError",
    "DataError",
    "EdgeOptError",
    "ModelError",
    "RegistryError",
]

#: Classified reasons a candidate can fail with.
FAILURE_REASONS = (
    "crash",  # the process died (native abort, segfault, non-zero exit)
    "oom",  # the process ran out of memory (killed, MemoryError, allocation failure)
    "timeout",  # the process hung past its time limit
    "unsupported-op",  # the toolchain cannot handle an operator of the model
    "missing-data",  # the recipe needs data (e.g. calibration) that was not given
    "unavailable",  # the toolchain is not installed on this machine
    "build-error",  # the toolchain failed to produce an artifact for another reason
    "accuracy",  # outputs are not finite or unusable
    "audit",  # the timed runs' outputs differ from the evaluation run's, or their timings look cached
    "network",  # the toolchain tried to reach the network (a hub download), which builds never may
    "no-output",  # the toolchain finished without producing a model (whatever its exit code said)
    "invalid-output",  # the toolchain produced a model that does not load and run
)


class EdgeOptError(Exception):
    """Base of every edgeopt error; the message is a single line for the user."""


class ConfigError(EdgeOptError):
    """A profile, recipe or setting is invalid."""


class ModelError(EdgeOptError):
    """A model file is missing, is not of its declared format, or is corrupt."""


class DataError(EdgeOptError):
    """Calibration or evaluation data is missing, mismatched with the model, or not finite."""


class BackendUnavailable(EdgeOptError):
    """A toolchain's optional dependency is not installed."""

    def __init__(self, backend: str, extra: str, detail: str = "") -> None:
        self.backend = backend
        self.extra = extra
        msg = f"backend '{backend}' is not available: install it with `pip install 'edgeopt[{extra}]'`"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class RegistryError(EdgeOptError):
    """A registered model, version or alias is missing or changed, or a lifecycle precondition fails."""


class CandidateFailed(EdgeOptError):
    """One candidate could not be built or measured; the flow records ``reason`` and goes on."""

    def __init__(self, reason: str, message: str, *, evidence: tuple[str, ...] = ()) -> None:
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; allowed: {', '.join(FAILURE_REASONS)}")
        self.reason = reason
        #: files that explain the failure (a toolchain's log, its config), recorded with the candidate
        self.evidence = tuple(evidence)
        super().__init__(message)
