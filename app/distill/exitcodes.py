"""Process exit codes of the `distill` entrypoint.

The Helm chart's JobSet failure policy keys on these numbers: a config or input error
fails the JobSet at once (restarting cannot fix it), while a retriable infrastructure
failure or a preemption that was checkpointed restarts the workers. Keep the chart's
`failurePolicy` rules (helm/distill/templates/jobset.yaml) in step with this table.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit status of one `distill` process."""

    OK = 0
    """The run finished and its final checkpoint is committed."""

    FAILED = 1
    """An unexpected error (a bug or an unclassified crash); the JobSet may restart it."""

    INVALID_CONFIG = 2
    """The experiment config is invalid; fix the values and reinstall. Never retried."""

    INVALID_INPUT = 3
    """Models or data do not fit the config (missing content field, empty source, vocabulary
    mismatch, teacher fidelity check failed). Never retried."""

    RETRIABLE = 75
    """An infrastructure failure that a restart can fix, such as a coordinator that did not
    come up within the initialisation timeout (75 is EX_TEMPFAIL from sysexits.h)."""

    PREEMPTED = 76
    """SIGTERM arrived, a checkpoint was committed and the process stopped; restart resumes."""


NON_RETRIABLE = (ExitCode.INVALID_CONFIG, ExitCode.INVALID_INPUT)
RETRIABLE = (ExitCode.FAILED, ExitCode.RETRIABLE, ExitCode.PREEMPTED)


class DistillError(Exception):
    """An error the entrypoint reports in one line and maps to an exit code."""

    exit_code: ExitCode = ExitCode.FAILED


class InvalidInputError(DistillError):
    """Models or data opened fine but do not fit the config; the message names the fix."""

    exit_code = ExitCode.INVALID_INPUT


class RetriableError(DistillError):
    """A failure of the surrounding infrastructure that a restart may fix."""

    exit_code = ExitCode.RETRIABLE
