"""One exception type for bad input, with a one-line message that names the problem."""


class AttributionError(ValueError):
    """Raised for bad input: wrong shapes, unknown names, targets out of range, mismatched checkpoints."""


def error_reason(exc: BaseException) -> str:
    """One line for an error row: the message's first line. Exceptions other than :class:`AttributionError`
    (bad input) are prefixed with their type (``TypeError: …``), so a bug is told apart from a bad sample."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, AttributionError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
