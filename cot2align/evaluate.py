"""Generation-based evaluation: DSKD's protocol (ROUGE-L over sampling seeds) and exact match.

Batched generation with left padding and a KV cache. Prompts are sorted by length and cut
into batches once, for the whole set; each batch's sampling RNG is seeded from (seed, batch
index), so the generations depend on the seed and `batch_size` only, not on how many ranks
share the batches (each rank takes a contiguous range of them; rank 0 gathers).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cot2align.configbase import ConfigBase, require
from cot2align.data.embedded import extract_answer
from cot2align.data.jsonl import DataError, Example, read_jsonl
from cot2align.data.prompts import cot_prompt, generation_tokenizer, model_input_ids, std_prompt
from cot2align.models import load_model, load_tokenizer


@dataclass
class EvalConfig(ConfigBase):
    """Evaluation settings (`eval.*`); the defaults are DSKD's protocol for instruction data."""

    prompt: Literal["cot", "std"] = "std"
    """Prompt format used to query the model (std: the Alpaca prompt; cot: the CoT prompt)."""
    decoding: Literal["greedy", "sample"] = "sample"
    """sample: one evaluation per seed, reported as mean +- std; greedy: one pass (first seed)."""
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    """Sampling seeds (one evaluation per seed; greedy uses the first only)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k filtering."""
    no_repeat_ngram_size: int = 6
    """Forbid repeating any n-gram of this size in a response (0 = off)."""
    max_new_tokens: int = 512
    """Response length limit (also capped by the model's context length)."""
    batch_size: int = 64
    answer_mode: Literal["auto", "the_answer_is", "last_number", "gsm8k", "none"] = "auto"
    """Exact match of the final answer. auto: on rows that carry an `answer` field, read from the
    generation as "the answer is: N" (else its last number); the other modes also take the gold
    answer from `output` when a row has no `answer`; none: no exact match."""
    chat_template: Literal["auto", "none"] = "auto"
    """auto: prompts of a tokenizer with a chat template (instruct models) are sent as a user turn and
    responses end at the end of the assistant turn; none: always BOS + prompt (`data.prompts`)."""
    breakdown: str = ""
    """A row field (e.g. `steps`, Dolly's `category`) whose values also get their own scores ('' = none)."""
    dev_decoding: Literal["one_seed", "greedy", "all_seeds"] = "one_seed"
    """Dev evaluation during training: `decoding` with the first seed only (DSKD's practice, cheap),
    greedy, or every seed."""
    dev_limit: int = 0
    """Evaluate on at most this many dev examples during training (0 = all)."""

    def check(self, prefix: str) -> None:
        require(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(len(self.seeds) >= 1, f"{prefix}.seeds", "needs at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), f"{prefix}.seeds", f"has duplicates: {self.seeds}")
        require(self.temperature > 0, f"{prefix}.temperature", f"must be > 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"{prefix}.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"{prefix}.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        require(self.no_repeat_ngram_size >= 0, f"{prefix}.no_repeat_ngram_size",
                f"must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        require(self.dev_limit >= 0, f"{prefix}.dev_limit", f"must be >= 0, got {self.dev_limit}")

    def run_seeds(self) -> list[int]:
        """The seeds one evaluation runs: all for sampling, the first for greedy."""
        return list(self.seeds) if self.decoding == "sample" else self.seeds[:1]

    def for_dev(self) -> EvalConfig:
        """The config of the dev evaluation during training (see `dev_decoding`)."""
        if self.dev_decoding == "greedy":
            return self.merged({"decoding": "greedy", "seeds": self.seeds[:1]})
        if self.dev_decoding == "one_seed":
            return self.merged({"seeds": self.seeds[:1]})
        return self


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` evaluation ranks (rank 0 gathers and scores)."""

    rank: int = 0
    world: int = 1
    group: Any = None

    @classmethod
    def from_dist(cls) -> Shard:
        """The default process group's rank and size, or one rank when torch.distributed is not initialised."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str, chat_template: str = "auto") -> list[int]:
    """Prompt token ids [T]: BOS + prompt exactly as training builds them, or the prompt as a user turn
    of the tokenizer's chat template when it has one and `chat_template` is 'auto' (instruct models)."""
    return model_input_ids(tok, prompt, chat_template)  # type: ignore[arg-type]  # checked there


def build_prompt(ex: Example, cfg: EvalConfig) -> str:
    """The prompt text of an example (templates live in `cot2align.data.prompts`)."""
    return cot_prompt(ex) if cfg.prompt == "cot" else std_prompt(ex)


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of each generation batch: sorted by prompt length (ties by index), `batch_size` per batch."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def shard_range(num_batches: int, shard: Shard) -> range:
    """The contiguous batch indices of `shard` (balanced to within one batch)."""
    return range(num_batches * shard.rank // shard.world, num_batches * (shard.rank + 1) // shard.world)


def batch_seed(seed: int, batch_index: int) -> int:
    """The RNG seed of one generation batch."""
    return seed * 1_000_003 + batch_index


@torch.no_grad()
def generate_batch(model: PreTrainedModel, tok: PreTrainedTokenizerBase, encoded: list[list[int]],
                   cfg: EvalConfig, seed: int) -> list[str]:
    """Responses (cut at the first EOS, special tokens dropped) to one batch of prompt ids.

    Builds left-padded input_ids / attention_mask [B, T] on the model's device; sampling
    draws from the global torch RNG seeded with `seed` first.
    """
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    conf = model.config
    max_pos = int(getattr(conf, "max_position_embeddings", 0) or getattr(conf, "n_positions", 0) or 10**9)
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for r, e in enumerate(encoded):
        ids[r, width - len(e) :] = torch.tensor(e)
        att[r, width - len(e) :] = 1
    new = min(cfg.max_new_tokens, max_pos - width)
    if new < 1:
        raise DataError(f"a prompt of {width} tokens leaves no room to generate (context {max_pos})")
    kwargs: dict[str, Any] = dict(max_new_tokens=new, eos_token_id=tok.eos_token_id, pad_token_id=pad)
    if cfg.decoding == "sample":
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    else:
        kwargs.update(do_sample=False)
    if cfg.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = cfg.no_repeat_ngram_size
    torch.manual_seed(seed)
    gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),  # type: ignore[operator]
                         **kwargs)[:, width:].cpu()
    out = []
    for row in gen.tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        out.append(str(tok.decode(row, skip_special_tokens=True)).strip())
    return out


def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], cfg: EvalConfig,
             seed: int, shard: Shard | None = None) -> dict[int, str]:
    """Responses to `prompts` by prompt index, for this shard's batches (all of them by default)."""
    model.eval()
    encoded = [prompt_ids(tok, p) for p in prompts]
    batches = plan_batches([len(e) for e in encoded], cfg.batch_size)
    out: dict[int, str] = {}
    for b in shard_range(len(batches), shard or Shard()):
        texts = generate_batch(model, tok, [encoded[i] for i in batches[b]], cfg, batch_seed(seed, b))
        out.update(zip(batches[b], texts, strict=True))
    return out


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure x 100, max over references (rouge-score `rougeL`, stemmer on)."""
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


_SCORER: Any = None


def _scorer() -> Any:
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def final_answer_of(text: str) -> str:
    """The answer part of a CoT response ("... Therefore, the answer is: X" -> X), else the text."""
    marker = "the answer is:"
    k = text.lower().rfind(marker)
    return text[k + len(marker) :].strip() if k >= 0 else text.strip()


def references_of(ex: Example) -> list[str]:
    """`output` plus the strings of an optional `references` list field (ROUGE-L takes the max)."""
    extra = ex.meta.get("references")
    if extra is None:
        return [ex.output]
    if not isinstance(extra, list) or not all(isinstance(r, str) for r in extra):
        raise DataError(f"{ex.source}: field 'references' must be a list of strings")
    return [ex.output, *extra]


def gold_answer(ex: Example, mode: str) -> str | None:
    """The normalised gold answer of a row under `answer_mode`, or None (the row has no exact match)."""
    if mode == "none" or (mode == "auto" and ex.answer is None):
        return None
    mode = "the_answer_is" if mode == "auto" else mode
    return extract_answer(ex.answer if ex.answer is not None else ex.output, mode)


def score(examples: list[Example], generations: dict[int, list[str]], cfg: EvalConfig) -> dict[str, Any]:
    """Scores of per-seed generations (seed -> one response per example).

    Returns n, seeds, rouge_l / rouge_l_std (mean and population std over seeds of the
    per-seed mean ROUGE-L), the same for exact_match over the `n_exact` rows with a gold
    answer (absent when none has one), per_seed, per_example (id, prompt, references,
    generations, rouge_l and exact per seed), by_<breakdown> and samples (first seed).
    """

    seeds = list(generations)
    mode = "the_answer_is" if cfg.answer_mode == "auto" else cfg.answer_mode
    golds = [gold_answer(ex, cfg.answer_mode) for ex in examples]
    per_example: list[dict[str, Any]] = []
    for i, ex in enumerate(examples):
        gens = [generations[s][i] for s in seeds]
        refs = references_of(ex)
        scored = [final_answer_of(g) if cfg.prompt == "cot" else g for g in gens]
        row: dict[str, Any] = {"id": ex.id, "prompt": build_prompt(ex, cfg), "references": refs,
                               "generations": gens, "rouge_l": [rouge_l(g, refs) for g in scored]}
        if golds[i] is not None:
            row["exact"] = [100.0 * float(extract_answer(g, mode) == golds[i]) for g in gens]
        if cfg.breakdown and cfg.breakdown in ex.meta:
            row["group"] = str(ex.meta[cfg.breakdown])
        per_example.append(row)
    result: dict[str, Any] = {"n": len(examples), "seeds": seeds, **_aggregate(per_example, seeds)}
    if cfg.breakdown:
        groups = sorted({r["group"] for r in per_example if "group" in r})
        result[f"by_{cfg.breakdown}"] = {
            g: {"n": sum(r.get("group") == g for r in per_example),
                **_aggregate([r for r in per_example if r.get("group") == g], seeds, with_per_seed=False)}
            for g in groups
        }
    result["per_example"] = per_example
    result["samples"] = [[r["prompt"], r["generations"][0], ex.output] for r, ex in zip(per_example, examples)]
    return result


def _aggregate(rows: list[dict[str, Any]], seeds: list[int], with_per_seed: bool = True) -> dict[str, Any]:
    """Mean over rows per seed, then mean and population std over seeds, for rouge_l and exact."""
    out: dict[str, Any] = {}
    per_seed: list[dict[str, float]] = [{"seed": s} for s in seeds]
    for key, name in (("rouge_l", "rouge_l"), ("exact", "exact_match")):
        have = [r for r in rows if key in r]
        if not have:
            continue
        vals = [statistics.fmean(r[key][k] for r in have) for k in range(len(seeds))]
        for k, v in enumerate(vals):
            per_seed[k][name] = v
        out[name] = statistics.fmean(vals)
        out[f"{name}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        if key == "exact":
            out["n_exact"] = len(have)
    if with_per_seed:
        out["per_seed"] = per_seed
    return out


def evaluate_sharded(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example],
                     cfg: EvalConfig, shard: Shard) -> dict[str, Any] | None:
    """`evaluate_examples` over several ranks: each generates its batches, rank 0 gathers and
    scores. Every rank of `shard.group` must call it; returns the result on rank 0, None elsewhere."""

    prompts = [build_prompt(ex, cfg) for ex in examples]
    gen_tok = generation_tokenizer(tok, cfg.chat_template)
    mine = {s: generate(model, gen_tok, prompts, cfg, s, shard) for s in cfg.run_seeds()}
    parts: list[Any] = [mine]
    if shard.world > 1:
        parts = [None] * shard.world if shard.rank == 0 else []
        dist.gather_object(mine, parts if shard.rank == 0 else None, dst=_global_rank(0, shard.group),
                           group=shard.group)
        if shard.rank != 0:
            return None
    merged: dict[int, list[str]] = {}
    for s in cfg.run_seeds():
        by_index: dict[int, str] = {}
        for part in parts:
            by_index.update(part[s])
        if len(by_index) != len(examples):
            raise RuntimeError(f"gathered {len(by_index)} generations for {len(examples)} examples")
        merged[s] = [by_index[i] for i in range(len(examples))]
    return score(examples, merged, cfg)


def _global_rank(group_rank: int, group: Any) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def evaluate_examples(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example],
                      cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate in this process with `cfg` as given (see `score` for the returned keys)."""
    res = evaluate_sharded(model, tok, examples, cfg, Shard())
    assert res is not None
    return res


# ----------------------------------------------------------------------------- files


def evaluate_files(model_dir: str | Path, data_files: list[Path], cfg: EvalConfig, out_dir: Path,
                   logger: Any = None, shard: Shard | None = None,
                   on_bad_row: Literal["error", "skip"] = "error", dtype: str = "float32") -> dict[str, Any] | None:
    """Evaluate an HF checkpoint folder on JSONL files (instruction / input / output rows).

    Rank 0 writes out_dir/eval_results.json (per dataset: the `score` summary without the
    per-example rows), eval_results.md (a table) and generations_<dataset>.jsonl (through
    `logger.log_table` when a MetricsLogger is given, which also makes a W&B table), and
    returns the results; other ranks return None.
    """

    shard = shard or Shard()
    model = load_model(model_dir, dtype)
    if torch.cuda.is_available():
        model.to(torch.device("cuda", torch.cuda.current_device()))  # type: ignore[arg-type]
    tok = load_tokenizer(model_dir)
    results: dict[str, Any] = {}
    for path in data_files:
        name = _unique(path.stem, results)
        examples, report = read_jsonl(path, on_bad_row)
        res = evaluate_sharded(model, tok, examples, cfg, shard)
        if res is None:
            continue
        per_example = res.pop("per_example")
        res.pop("samples")
        results[name] = {"file": str(path), "skipped_rows": report.total_skipped, **res}
        columns = ["id", "seed", "prompt", "generation", "references", "rouge_l", "exact"]
        rows = [[r["id"], s, r["prompt"], r["generations"][k], json.dumps(r["references"]), r["rouge_l"][k],
                 r["exact"][k] if "exact" in r else None]
                for r in per_example for k, s in enumerate(res["seeds"])]
        if logger is not None:
            logger.log_table(f"generations/{name}", columns, rows)
            logger.log(0, {f"{name}/{k}": v for k, v in res.items() if isinstance(v, float)}, prefix="eval/")
        else:
            _write_rows(out_dir / f"generations_{name}.jsonl", columns, rows)
    if shard.rank != 0:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"model": str(model_dir), "config": cfg.to_dict(), "datasets": results}
    (out_dir / "eval_results.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "eval_results.md").write_text(eval_table(results) + "\n")
    return summary


def _unique(name: str, taken: dict[str, Any]) -> str:
    out, k = name, 2
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    return out


def _write_rows(path: Path, columns: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(dict(zip(columns, r, strict=True)), ensure_ascii=False) + "\n")


def mean_std(res: dict[str, Any], key: str) -> str:
    """"m.mm +- s.ss" of `key` / `key_std` in a result dict, "-" when absent."""
    if res.get(key) is None:
        return "-"
    return f"{res[key]:.2f} ± {res.get(f'{key}_std', 0.0):.2f}"


def eval_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: dataset, n, ROUGE-L and exact match (mean +- std over seeds), per-seed ROUGE-L."""
    lines = ["| dataset | n | ROUGE-L | exact match | ROUGE-L per seed |", "|---|---|---|---|---|"]
    for name, r in results.items():
        seeds = ", ".join(f"{s['seed']}: {s['rouge_l']:.2f}" for s in r.get("per_seed", []))
        em = mean_std(r, "exact_match") + (f" (n={r['n_exact']})" if r.get("n_exact") else "")
        lines.append(f"| {name} | {r['n']} | {mean_std(r, 'rouge_l')} | {em} | {seeds} |")
    return "\n".join(lines)


def results_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown table: model, exact match and ROUGE-L (mean +- std over the seeds), exact match per steps."""
    steps = sorted({s for v in summary.values() for s in (v.get("exact_match_by_steps") or {})})
    head = "| model | exact match | ROUGE-L | " + " | ".join(f"EM {s} steps" for s in steps) + " |"
    lines = [head, "|" + "---|" * (3 + len(steps))]
    for name, v in summary.items():
        cells = [name, mean_std(v, "exact_match"), mean_std(v, "rouge_l")]
        cells += [f"{(v.get('exact_match_by_steps') or {}).get(s, float('nan')):.1f}" for s in steps]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = next((v.get("seeds") for v in summary.values() if v.get("seeds")), None)
    if seeds:
        lines.append(f"\nmean ± std over seeds {seeds}")
    return "\n".join(lines)
