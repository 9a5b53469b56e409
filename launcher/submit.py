"""Start a CoT2Align run: `python launcher/submit.py [--config FILE] [key=value ...]`.

Without arguments it runs the embedded default pipeline locally (data -> teacher ->
distill -> evaluate) on this machine's CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config (default: configs/embedded.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.ot.sinkhorn.epsilon=0.1")
    args = ap.parse_args(argv)
    from cot2align.cli import main as cli_main

    return cli_main(["pipeline", *(["--config", args.config] if args.config else []), *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
