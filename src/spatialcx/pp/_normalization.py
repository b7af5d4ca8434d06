"""Detect how a matrix is normalized and find raw counts (being implemented; see the contract in the issue)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NormalizationStatus:  # noqa: D101
    raw_source: str | None
    x_state: str
    x_target_sum: float | None
    is_usable: bool
    has_log1p_uns: bool
    stats: dict = field(default_factory=dict)


def normalization_status(adata):  # noqa: D103
    raise NotImplementedError


def ensure_normalized(adata, *, target_sum=1e4, unsafe_force=False):  # noqa: D103
    raise NotImplementedError


def find_expression_source(adata, *, unsafe_force=False):  # noqa: D103
    raise NotImplementedError
