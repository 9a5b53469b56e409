"""`cot2align <stage> [--config FILE] [key=value ...]`: the pipeline stages from the command line."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cot2align.config import Config, load_config
from cot2align.configbase import ConfigError
from cot2align.evaluate import Shard, eval_table, evaluate_files
from cot2align.logging import MetricsLogger, setup_console_logging
from cot2align.plan import main as plan_main
from cot2align.recipes.cot import generate_cot
from cot2align.recipes.pipeline import distill, run_embedded
from cot2align.recipes.prepare import paths, prepare_data, train_teacher
from cot2align.report import write_report

STAGES = ("prepare-data", "train-teacher", "generate-cot", "distill", "evaluate", "pipeline", "show-config", "plan",
          "report")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="cot2align", description=__doc__)
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--config", default=None, help="YAML config (default: configs/embedded.yaml)")
    ap.add_argument("--model", default=None, help="evaluate: HF checkpoint folder (default: the run's export)")
    ap.add_argument("--split", default="test", choices=["dev", "test"],
                    help="evaluate: the config's split to use when --data is not given")
    ap.add_argument("--data", nargs="+", default=None, metavar="JSONL",
                    help="evaluate: instruction/input/output JSONL files (one result per file)")
    ap.add_argument("--out", default=None, help="evaluate: output folder (default: <run dir>/eval/<model name>)")
    ap.add_argument("--force", action="store_true", help="train-teacher: retrain even when cached")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.ot.epsilon=0.1")
    return ap.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = parse(argv)
    if args.data:  # `--data a.jsonl b.jsonl key=value` also swallows overrides: give them back
        args.overrides += [d for d in args.data if _is_override(d)]
        args.data = [d for d in args.data if not _is_override(d)]
    setup_console_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.stage == "show-config":
        print(cfg.to_yaml())
    elif args.stage == "prepare-data":
        print(prepare_data(cfg))
    elif args.stage == "train-teacher":
        print(train_teacher(cfg, force=args.force))
    elif args.stage == "generate-cot":
        print(generate_cot(cfg))
    elif args.stage == "distill":
        done = distill(cfg)
        print(f"exported {done.export_dir} after {done.steps} steps (best dev {done.best_dev})")
    elif args.stage == "evaluate":
        return evaluate_main(cfg, args)
    elif args.stage == "pipeline":
        run_embedded(cfg)
    return 0


def _is_override(item: str) -> bool:
    return re.match(r"^[A-Za-z_][\w.]*=", item) is not None and not Path(item).exists()


def evaluate_main(cfg: Config, args: argparse.Namespace) -> int:
    """`cot2align evaluate`: one model on --data files (or the config's split), on every rank of a
    torchrun-style launch (RANK / WORLD_SIZE in the environment); rank 0 writes the results."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    shard = Shard.from_dist()
    model = Path(args.model) if args.model else cfg.run_dir / "best"
    if args.data:
        files = [Path(d) for d in args.data]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            print(f"evaluate: --data file(s) not found: {', '.join(missing)}", file=sys.stderr)
            return 2
    else:
        if shard.rank == 0:
            prepare_data(cfg)
        if shard.world > 1:
            dist.barrier()
        p = paths(cfg)
        files = [{"dev": p.dev, "test": p.test}[args.split]]
    out = Path(args.out) if args.out else cfg.run_dir / "eval" / model.name
    logger = None
    if shard.rank == 0:
        logger = MetricsLogger(out, cfg.logging, {"model": str(model), "data": [str(f) for f in files],
                                                  "eval": cfg.eval.to_dict()},
                               name=f"eval-{model.name}", job_type="evaluate")
    try:
        res = evaluate_files(model, files, cfg.eval, out, logger, shard, cfg.data.on_bad_row)
    finally:
        if logger is not None:
            logger.close()
        if shard.world > 1:
            dist.destroy_process_group()
    if res is not None:
        print(eval_table(res["datasets"]))
        print(f"results in {out}/eval_results.json, generations in {out}/generations_*.jsonl")
    return 0


def report_main(argv: list[str]) -> int:
    """`cot2align report RUN_DIR [--out DIR]`: plots and report.md of a run directory."""
    ap = argparse.ArgumentParser(prog="cot2align report", description="PNG plots and a markdown summary of a run")
    ap.add_argument("run_dir", help="a run directory (with metrics.jsonl)")
    ap.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
