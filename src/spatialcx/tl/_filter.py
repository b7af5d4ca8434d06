"""Being implemented."""


def filter_low_confidence(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


def filter_low_count_types(*args, **kwargs):  # noqa: D103
    raise NotImplementedError
