"""Being implemented."""


def panel_genes(*args, **kwargs):  # noqa: D103
    raise NotImplementedError
