"""One exception type for bad input, with a one-line message that names the problem."""


class AttributionError(ValueError):
    """Raised for bad input: wrong shapes, unknown names, targets out of range, mismatched checkpoints."""


def error_reason(exc: BaseException) -> str:
    """One line for an error row: the message's first line. Bad input (:class:`AttributionError`, ValueError) and
    run-time failures (RuntimeError such as out-of-memory, OSError) give their message; any other exception type
    (TypeError, AttributeError, KeyError … — a bug more likely than a bad sample) is prefixed with its type name."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, (ValueError, RuntimeError, OSError)) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
