"""One exception type for bad input, with a one-line message that names the problem."""


class AttributionError(ValueError):
    """Raised for bad input: wrong shapes, unknown names, targets out of range, mismatched checkpoints."""
