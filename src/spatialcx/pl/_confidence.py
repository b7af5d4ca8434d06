"""Confidence plot (being implemented)."""


def confidence(data, **kwargs):  # noqa: D103
    raise NotImplementedError
