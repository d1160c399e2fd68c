"""AdaCLIP's own options; torch-free (model/options.py)."""

from __future__ import annotations

from dataclasses import dataclass

from model.options import option


@dataclass(frozen=True)
class AdaCLIPOptions:
    hsf: bool = option(False, "hybrid semantic fusion for image scores (its image score from clustered patch "
                       "tokens)", flag="--hsf")
    k_clusters: int = option(20, "clusters of the hybrid semantic fusion", minimum=1)
