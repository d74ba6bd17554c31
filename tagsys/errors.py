"""One exception root for the whole project (quix-streams style).

Everything tagstream raises on purpose derives from `TagstreamError`, so callers and the CLI
can tell our own, explained failures from bugs. Each class carries the CLI's exit code, so a
supervisor or script can tell a fix-your-input error from an outage and from a crash:

| code | meaning |
| --- | --- |
| 0 | success |
| 1 | runtime failure: the service stopped on a fault it could not ride out, or a bug |
| 2 | usage error: an unknown option or a bad value (typer's) |
| 3 | configuration or input error: a setting, file, model or topic to fix |
| 4 | unavailable: a broker or endpoint could not be reached (or refused the credentials) |
"""

from typing import ClassVar

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 4


class TagstreamError(Exception):
    """Root of every error tagstream raises on purpose; by default the input or the
    configuration is what needs fixing."""

    exit_code: ClassVar[int] = EXIT_CONFIG


class UnavailableError(TagstreamError):
    """Something tagstream needs at start could not be reached: retry later or fix the
    address or credentials, not the input."""

    exit_code: ClassVar[int] = EXIT_UNAVAILABLE


class RuntimeFailure(TagstreamError):
    """The service met a fault it cannot ride out and stopped; a restart resumes from the
    last commit."""

    exit_code: ClassVar[int] = EXIT_RUNTIME


class TagSystemError(TagstreamError):
    """A tag-system artifact is missing, malformed or inconsistent."""


class EncoderMismatchError(TagSystemError):
    """The tag embeddings were made by another encoder than the one in use."""
