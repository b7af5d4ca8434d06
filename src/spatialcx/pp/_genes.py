"""The genes of a spatial panel."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: Names of control features in Xenium, CosMx and MERSCOPE panels (negative-control probes and codewords, blanks).
CONTROL_FEATURE_PATTERN = re.compile(
    r"^(NegControl|Negative|NegPrb|UnassignedCodeword|DeprecatedCodeword|SystemControl|Intergenic|"
    r"BLANK|Blank|antisense_|FalseCode)",
)


def panel_genes(data: AnnData | SpatialData, *, table_key: str = "table") -> list[str]:
    """The measured genes of a spatial table, without control probes and codewords.

    Features are dropped when ``var["feature_types"]`` (10x) says they are not ``"Gene Expression"``, or when their
    name marks a control (``NegControlProbe_*``, ``NegControlCodeword_*``, ``UnassignedCodeword_*``, ``BLANK_*``,
    ``Blank-*``, ``NegPrb*``, ``SystemControl*``, ...).

    Parameters
    ----------
    data
        The spatial data or its table.
    table_key
        The table of a SpatialData.

    Returns
    -------
    Gene names in the table's order.
    """
    from spatialcx._table import get_table

    adata = get_table(data, table_key=table_key)
    names = pd.Index(adata.var_names.astype(str))
    keep = ~names.str.match(CONTROL_FEATURE_PATTERN)
    if "feature_types" in adata.var:
        keep &= (adata.var["feature_types"].astype(str) == "Gene Expression").to_numpy()
    genes = names[keep].tolist()
    if not genes:
        raise ValueError(
            f"The table has no gene features ({adata.n_vars} features, all control probes or non-gene features)."
        )
    return genes
