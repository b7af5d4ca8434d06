"""Being implemented."""


def predict(*args, **kwargs):  # noqa: D103
    raise NotImplementedError


def train(*args, **kwargs):  # noqa: D103
    raise NotImplementedError
