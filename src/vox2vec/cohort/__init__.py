"""Cohort mode: embed many CTs with the model loaded once (resumable, shardable by torchrun) and tabulate features
per region or point."""

from vox2vec.cohort.embed_many import (
    KEEP_REGIONS,
    STORAGE_DTYPES,
    CohortRun,
    Shard,
    Storage,
    embed_many,
    iter_embed_many,
)
from vox2vec.cohort.inputs import CaseInput, discover
from vox2vec.cohort.manifest import CaseResult, read_manifest

__all__ = ["KEEP_REGIONS", "STORAGE_DTYPES", "CaseInput", "CaseResult", "CohortRun", "Shard", "Storage", "discover",
           "embed_many", "iter_embed_many", "read_manifest"]
