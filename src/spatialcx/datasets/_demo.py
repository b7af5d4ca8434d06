"""Demo dataset (being implemented)."""


def demo(**kwargs):  # noqa: D103
    raise NotImplementedError
