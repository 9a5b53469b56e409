"""Generation-based evaluation: exact match of the final answer and ROUGE-L.

Batched generation with left padding and a KV cache; prompts are sorted by length
to limit padding. Greedy decoding, or the DSKD sampling protocol over several seeds
(reported as mean +- std).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cot2align.configbase import ConfigBase, require
from cot2align.data.jsonl import Example
from cot2align.data.prompts import cot_prompt, std_prompt


@dataclass
class EvalConfig(ConfigBase):
    """Evaluation settings (`eval.*`)."""

    prompt: Literal["cot", "std"] = "cot"
    """Prompt format used to query the model."""
    decoding: Literal["greedy", "sample"] = "greedy"
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    """Sampling seeds (one evaluation per seed; greedy uses the first only)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 0
    max_new_tokens: int = 128
    batch_size: int = 64
    answer_mode: Literal["the_answer_is", "last_number", "gsm8k", "none"] = "the_answer_is"
    """How the final answer is extracted for exact match ('none' = no exact match)."""
    dev_limit: int = 0
    """Evaluate on at most this many dev examples during training (0 = all)."""

    def check(self, prefix: str) -> None:
        require(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(len(self.seeds) >= 1, f"{prefix}.seeds", "needs at least one seed")


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt token ids exactly as training builds them (BOS + prompt)."""
    ids = tok.encode(prompt, add_special_tokens=False)
    return [tok.bos_token_id, *ids] if tok.bos_token_id is not None else ids


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], cfg: EvalConfig,
             seed: int) -> list[str]:
    """Generate one response per prompt (cut at EOS), batched, in the input order."""
    model.eval()
    encoded = [prompt_ids(tok, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    conf = model.config
    max_pos = int(getattr(conf, "max_position_embeddings", 0) or getattr(conf, "n_positions", 0) or 10**9)
    torch.manual_seed(seed)
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start : start + cfg.batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for r, i in enumerate(chunk):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            att[r, width - len(encoded[i]) :] = 1
        kwargs: dict[str, Any] = dict(max_new_tokens=min(cfg.max_new_tokens, max_pos - width),
                                      eos_token_id=tok.eos_token_id, pad_token_id=pad)
        if cfg.decoding == "sample":
            kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        else:
            kwargs.update(do_sample=False)
        if cfg.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = cfg.no_repeat_ngram_size
        gen = model.generate(input_ids=ids, attention_mask=att, **kwargs)[:, width:]  # type: ignore[operator]
        for r, i in enumerate(chunk):
            toks = gen[r].tolist()
            if tok.eos_token_id in toks:
                toks = toks[: toks.index(tok.eos_token_id)]
            out[i] = str(tok.decode(toks, skip_special_tokens=True)).strip()
    return out


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure x 100, max over references (rouge-score, stemmer on)."""

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
    low = text.lower()
    k = low.rfind(marker)
    return text[k + len(marker) :].strip() if k >= 0 else text.strip()


def evaluate_examples(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example],
                      cfg: EvalConfig) -> dict[str, Any]:
    """Exact match (when answers are checkable) and ROUGE-L of the answer part, per seed and mean/std.

    Returns {"exact_match": mean, "exact_match_std": std, "rouge_l": ..., "rouge_l_std": ...,
    "per_seed": [...], "samples": [[prompt, generation, gold], ...] (first seed)}.
    """
    from cot2align.data.embedded import extract_answer

    make = cot_prompt if cfg.prompt == "cot" else std_prompt
    prompts = [make(ex) for ex in examples]
    seeds = cfg.seeds if cfg.decoding == "sample" else cfg.seeds[:1]
    per_seed = []
    samples: list[list[str]] = []
    for seed in seeds:
        gens = generate(model, tok, prompts, cfg, seed)
        em = []
        rl = []
        for ex, g in zip(examples, gens, strict=True):
            rl.append(rouge_l(final_answer_of(g), [ex.output]))
            if cfg.answer_mode != "none":
                gold = extract_answer(ex.answer if ex.answer is not None else ex.output, cfg.answer_mode)
                em.append(float(gold is not None and extract_answer(g, cfg.answer_mode) == gold))
        per_seed.append({"seed": seed, "rouge_l": statistics.fmean(rl),
                         **({"exact_match": 100.0 * statistics.fmean(em)} if em else {})})
        if not samples:
            samples = [[p, g, ex.output] for p, g, ex in zip(prompts, gens, examples, strict=True)]
    result: dict[str, Any] = {"n": len(examples), "per_seed": per_seed, "samples": samples}
    for key in ("exact_match", "rouge_l"):
        vals = [s[key] for s in per_seed if key in s]
        if vals:
            result[key] = statistics.fmean(vals)
            result[f"{key}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return result
