"""Detection stage: exact streaming median/MAD statistics and the MAD outlier rule.

``robust_stats``/``median_mad`` give the exact median and MAD of a score vector of any size
(in memory, memmapped or a ``.npy`` path); ``flag`` returns the indices above
``median + k * MAD``. ``RadixSelector`` is the underlying shardable selection state machine.
``refine_by_split`` (an experiment, not a default; ``ffengine trace --threshold mad-split``)
keeps the upper group of a flagged set where Otsu's split of it is clear.
"""

from ffengine.detect.mad import (
    DEFAULT_K,
    MADStats,
    flag,
    median_mad,
    median_ranks,
    robust_stats,
    threshold,
)
from ffengine.detect.select import (
    DEFAULT_CHUNK_SIZE,
    RadixSelector,
    ScoreSource,
    float_keys,
    keys_to_floats,
    kth_smallest,
    open_scores,
    run_selection,
)
from ffengine.detect.split import (
    OTSU_MIN_ETA,
    Split,
    otsu_split,
    refine_by_split,
    refine_flagged_file,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_K",
    "MADStats",
    "OTSU_MIN_ETA",
    "RadixSelector",
    "ScoreSource",
    "Split",
    "flag",
    "float_keys",
    "keys_to_floats",
    "kth_smallest",
    "median_mad",
    "median_ranks",
    "open_scores",
    "otsu_split",
    "refine_by_split",
    "refine_flagged_file",
    "robust_stats",
    "run_selection",
    "threshold",
]
