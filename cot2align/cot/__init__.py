"""Teacher rationale generation (CoT augmentation) with an answer-consistency filter."""

from cot2align.cot.generate import (
    CotGenConfig,
    CotGenStats,
    GenerateFn,
    generate_cot,
    generate_rationales,
    judge_generation,
    merge_cot_shards,
    merge_shards,
    split_generation,
)

__all__ = [
    "CotGenConfig",
    "CotGenStats",
    "GenerateFn",
    "generate_cot",
    "generate_rationales",
    "judge_generation",
    "merge_cot_shards",
    "merge_shards",
    "split_generation",
]
