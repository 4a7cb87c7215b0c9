"""Production-readiness checks, cross-validation and the certification report (no Prefect, no MLflow).

One module per check; each returns a ``CheckResult`` (``edgeopt.certify.records``) with its evidence.
"""

from edgeopt.certify.records import (
    Certification,
    CheckResult,
    CheckStatus,
    CrossValidation,
    MatrixCell,
    Subject,
)

__all__ = ["Certification", "CheckResult", "CheckStatus", "CrossValidation", "MatrixCell", "Subject"]
