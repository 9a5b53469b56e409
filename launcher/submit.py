"""Start a CoT2Align run: `python launcher/submit.py [--config FILE] [--nodes N] ... [key=value ...]`.

Without arguments it runs the embedded default pipeline locally (data -> teacher ->
distill -> evaluate) on this machine's CPU. With Slurm (sbatch and srun on PATH) it submits
ONE job of N nodes x G tasks through submitit; `--dry-run` prints the resolved config, the
plan and the sbatch script; `--help` lists every flag. The logic lives in `cot2align.launch.submit`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    """Run `cot2align.launch.submit.main` (see its module docstring for the modes)."""
    from cot2align.launch.submit import main as launch_main

    return launch_main(argv)


if __name__ == "__main__":
    sys.exit(main())
