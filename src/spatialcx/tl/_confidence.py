"""Being implemented."""


def transform_confidence(*args, **kwargs):  # noqa: D103
    raise NotImplementedError
