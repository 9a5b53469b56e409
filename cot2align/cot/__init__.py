"""Teacher rationale generation (CoT augmentation) with an answer-consistency filter; the stage
that runs it from a config is `cot2align.recipes.cot`."""
