"""Being implemented."""


class CellTypeModel:  # noqa: D101
    pass
