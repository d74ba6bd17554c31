"""One exception root for the whole project (quix-streams style).

Everything tagstream raises on purpose derives from `TagstreamError`, so callers and the CLI
can tell our own, explained failures from bugs.
"""


class TagstreamError(Exception):
    """Root of every error tagstream raises on purpose."""


class TagSystemError(TagstreamError):
    """A tag-system artifact is missing, malformed or inconsistent."""


class EncoderMismatchError(TagSystemError):
    """The tag embeddings were made by another encoder than the one in use."""
