"""`cot2align <stage> [--config FILE] [key=value ...]`: the pipeline stages from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cot2align.configbase import ConfigError

STAGES = ("prepare-data", "train-teacher", "generate-cot", "distill", "evaluate", "pipeline", "show-config", "plan")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="cot2align", description=__doc__)
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--config", default=None, help="YAML config (default: configs/embedded.yaml)")
    ap.add_argument("--model", default=None, help="evaluate: HF checkpoint folder (default: the run's export)")
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    ap.add_argument("--force", action="store_true", help="train-teacher: retrain even when cached")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.ot.epsilon=0.1")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        from cot2align.plan import main as plan_main

        return plan_main(argv[1:])
    args = parse(argv)
    from cot2align.config import load_config
    from cot2align.logging import setup_console_logging

    setup_console_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from cot2align import pipeline

    if args.stage == "show-config":
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    elif args.stage == "prepare-data":
        print(pipeline.prepare_data(cfg))
    elif args.stage == "train-teacher":
        print(pipeline.train_teacher(cfg, force=args.force))
    elif args.stage == "generate-cot":
        from cot2align.cot import generate_cot

        print(generate_cot(cfg))
    elif args.stage == "distill":
        done = pipeline.distill(cfg)
        print(f"exported {done.export_dir} after {done.steps} steps (best dev {done.best_dev})")
    elif args.stage == "evaluate":
        model = Path(args.model) if args.model else cfg.run_dir / "best"
        res = pipeline.evaluate_model(cfg, model, args.split)
        res.pop("samples")
        print(json.dumps(res, indent=2))
    elif args.stage == "pipeline":
        pipeline.run_embedded(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
