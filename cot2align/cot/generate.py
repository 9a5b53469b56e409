"""`cot2align generate-cot`: the teacher writes a rationale for every training example.

The teacher is prompted with the CoT template (docs/method.md section 2) and samples a
continuation, which (the teacher being trained on the CoT target format) reads
"<rationale>\\nTherefore, the answer is: X". The rationale is the part before the
answer bridge; X is checked against the gold answer when the task has a checkable one
(answer-consistency filter), and a failed sample is regenerated with a new seed up to
`max_tries` times. Examples left without a valid rationale are written without one
(they become std-only samples downstream). A chat (instruct) teacher gets the CoT prompt as the
user turn of its tokenizer's chat template and stops at the template's end of turn
(`cot.chat_template`, implemented in `cot2align.data.prompts`).

Output: a NEW JSONL (the input is never modified), appended batch by batch and flushed,
so an interrupted run resumes where it stopped: ids already written are skipped and a
partially written last line is cut off. When every example is done the file is
rewritten in input order, and `<out>.stats.json` (suffix replaced) holds the counts.
Each row also carries its own counts under `cot_gen`, so totals survive resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cot2align.configbase import ConfigBase, require
from cot2align.data.embedded import extract_answer
from cot2align.data.jsonl import DataError, Example, write_jsonl
from cot2align.data.prompts import ANSWER_BRIDGE, cot_prompt, generation_tokenizer, model_input_ids
from cot2align.evaluate import EvalConfig, generate
from cot2align.logging import log
from cot2align.models import load_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GenerateFn = Callable[[list[str], int], list[str]]
"""(prompts, seed) -> one generated continuation per prompt, in order."""

_BRIDGE = ANSWER_BRIDGE.strip()  # "Therefore, the answer is:" (generation output is stripped)
_COUNT_KEYS = ("kept", "dropped", "regenerated", "regenerations", "unchecked", "generations")


@dataclass
class CotGenConfig(ConfigBase):
    """Teacher rationale generation (`cot.*`)."""

    enabled: bool = True
    """Train on teacher-generated rationales (the pipeline runs generate-cot before distilling)."""
    temperature: float = 0.7
    """Sampling temperature (0 = greedy; then every try gives the same text)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    max_new_tokens: int = 160
    """Longest continuation (rationale + answer) per sample."""
    samples_per_example: int = 1
    """Rationales to sample per example; the first valid one is `rationale`, all valid ones `rationales`."""
    max_tries: int = 3
    """Generations per sample, the first included: a rejected sample is regenerated with a new seed."""
    filter: bool = True
    """Drop (or regenerate) rationales whose final answer disagrees with the gold answer."""
    answer_mode: Literal["the_answer_is", "last_number", "gsm8k", "none"] = "the_answer_is"
    """Answer extractor for the filter ('none' = answers are not checkable: no filtering)."""
    batch_size: int = 64
    """Prompts per generate call."""
    chat_template: Literal["auto", "none"] = "auto"
    """auto: prompt chat (instruct) teachers through their tokenizer's chat template (the CoT prompt is
    the user turn; generation stops at the template's end-of-turn token); none: BOS + prompt always."""
    output: str = ""
    """Output JSONL ('' = <run.work_dir>/cot-<digest of teacher, data, sampling settings>.jsonl)."""
    backend: Literal["hf", "vllm"] = "hf"
    """hf: transformers `generate` (batched, KV cache; CPU or GPU); vllm: vLLM's engine (GPU clusters,
    `pip install vllm`); both take the same prompts, sampling settings and seeds."""

    def check(self, prefix: str) -> None:
        require(self.temperature >= 0, f"{prefix}.temperature", f"must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"{prefix}.top_p", f"must be in (0, 1], got {self.top_p}")
        for key in ("max_new_tokens", "samples_per_example", "max_tries", "batch_size"):
            value = getattr(self, key)
            require(value >= 1, f"{prefix}.{key}", f"must be >= 1, got {value}")


@dataclass
class CotGenStats:
    """Counts of a generation run. Per-sample counts cover the whole output file."""

    examples: int = 0
    """Rows in the output."""
    with_rationale: int = 0
    without_rationale: int = 0
    """Rows written without a rationale (no valid sample after max_tries)."""
    kept: int = 0
    """Samples that ended with a valid rationale (after regeneration, if any)."""
    dropped: int = 0
    """Samples without a valid rationale after max_tries."""
    regenerated: int = 0
    """Samples rejected on their first try and regenerated."""
    regenerations: int = 0
    """Generations spent on regeneration."""
    unchecked: int = 0
    """Kept samples whose answer could not be checked (filter off, or no checkable gold answer)."""
    generations: int = 0
    """Texts generated in total."""
    generated_now: int = 0
    """Examples generated by this call (the rest were found done in the output file)."""
    resumed: int = 0
    """Examples found done in the output file."""

    def summary(self) -> str:
        """One line for the console."""
        return (f"generate-cot: {self.examples} examples, {self.with_rationale} with a rationale, "
                f"{self.without_rationale} without; samples kept {self.kept}, dropped {self.dropped}, "
                f"regenerated {self.regenerated} ({self.regenerations} regenerations, "
                f"{self.generations} generations); unchecked {self.unchecked}; "
                f"this run generated {self.generated_now}, resumed {self.resumed}")


# ----------------------------------------------------------------------------- the filter


def split_generation(text: str) -> str:
    """The rationale of a generated CoT response: the text before the answer bridge (all of it when absent)."""
    k = text.find(_BRIDGE)
    return (text[:k] if k >= 0 else text).strip()


def gold_answer(ex: Example, mode: str) -> str | None:
    """The normalised gold answer (row `answer`, else `output`) under `mode`; None if not checkable."""
    if mode == "none":
        return None
    if ex.answer is not None:
        return extract_answer(ex.answer, mode) or extract_answer(ex.answer, "last_number")
    return extract_answer(ex.output, mode)


def judge_generation(text: str, gold: str | None, mode: str) -> tuple[str | None, bool]:
    """Check one generated response: (its rationale, or None when invalid; whether the answer was checked).

    Invalid: an empty rationale, or (with a gold answer and mode != 'none') a predicted answer, extracted
    from the whole text, that differs from `gold`.
    """
    rationale = split_generation(text)
    if not rationale:
        return None, False
    if gold is None or mode == "none":
        return rationale, False
    return (rationale if extract_answer(text, mode) == gold else None), True


def _seed(base: int, attempt: int, key: str) -> int:
    """A sampling seed per (run seed, try, batch), stable across resumes."""
    return (base * 1_000_003 + attempt * 7919 + zlib.crc32(key.encode())) % 2**31


def rationales_for(chunk: Sequence[Example], generate_fn: GenerateFn, cfg: CotGenConfig,
                   seed: int) -> list[tuple[list[str], dict[str, int]]]:
    """Sample, filter and regenerate rationales for a batch of examples.

    Returns per example (valid rationales, counts over `_COUNT_KEYS`). Each try is one
    `generate_fn` call on the samples still lacking a valid rationale.
    """
    mode = cfg.answer_mode if cfg.filter else "none"
    golds = [gold_answer(ex, mode) for ex in chunk]
    prompts = [cot_prompt(ex) for ex in chunk]
    found: list[list[str]] = [[] for _ in chunk]
    counts = [dict.fromkeys(_COUNT_KEYS, 0) for _ in chunk]
    pending = [i for i in range(len(chunk)) for _ in range(cfg.samples_per_example)]  # sample -> example
    for attempt in range(cfg.max_tries):
        if not pending:
            break
        texts = generate_fn([prompts[i] for i in pending], _seed(seed, attempt, chunk[0].id))
        if len(texts) != len(pending):
            raise RuntimeError(f"generate_fn returned {len(texts)} texts for {len(pending)} prompts")
        failed = []
        for i, text in zip(pending, texts, strict=True):
            c = counts[i]
            c["generations"] += 1
            c["regenerations"] += int(attempt > 0)
            rationale, checked = judge_generation(text, golds[i], mode)
            if rationale is None:
                failed.append(i)
                c["regenerated"] += int(attempt == 0 and cfg.max_tries > 1)
            else:
                found[i].append(rationale)
                c["kept"] += 1
                c["unchecked"] += int(not checked)
        pending = failed
    for i in pending:
        counts[i]["dropped"] += 1
    return list(zip(found, counts, strict=True))


# ----------------------------------------------------------------------------- the output file


def example_row(ex: Example, rationales: list[str], counts: dict[str, int], samples: int = 1) -> dict[str, Any]:
    """The output row: the example's fields, `rationale` (first valid) when any, `rationales` when samples > 1."""
    row: dict[str, Any] = {"id": ex.id, "instruction": ex.instruction, "input": ex.input, "output": ex.output}
    if ex.answer is not None:
        row["answer"] = ex.answer
    row.update({k: v for k, v in ex.meta.items() if k not in ("rationale", "rationales", "cot_gen")})
    if rationales:
        row["rationale"] = rationales[0]
        if samples > 1:
            row["rationales"] = rationales
    row["cot_gen"] = counts
    return row


def shard_examples(examples: Sequence[Example], rank: int, world_size: int) -> list[Example]:
    """This rank's share: the examples whose index is `rank` modulo `world_size`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return [ex for i, ex in enumerate(examples) if i % world_size == rank]


def shard_path(out: Path, rank: int, world_size: int) -> Path:
    """Where rank `rank` of `world_size` writes its share of `out`."""
    return out.with_name(f"{out.stem}.shard{rank}-of-{world_size}{out.suffix}")


def stats_path(out: Path) -> Path:
    """The counts written next to an output file: <out stem>.stats.json."""
    return out.with_suffix(".stats.json")


def load_done(path: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Rows already written to `path` (id -> row); a broken last line (crash mid-write) is truncated away.

    Raises DataError for a broken line before the last, a duplicate id, or an id not in `wanted`
    (the file belongs to other input data).
    """
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last element follows the final newline: empty, or a partial line
    last = max((n for n, raw in enumerate(lines, start=1) if raw.strip()), default=0)
    done: dict[str, dict[str, Any]] = {}
    good_end = pos = 0
    for lineno, raw in enumerate(lines, start=1):
        complete = lineno < len(lines)
        end = pos + len(raw) + int(complete)
        if raw.strip():
            try:
                row = json.loads(raw)
                if not isinstance(row, dict) or "id" not in row:
                    raise ValueError("not a row object with an id")
            except ValueError as e:
                if lineno == last:  # the last line, newline-terminated or not: cut off, redo
                    break
                raise DataError(f"{path}:{lineno}: broken row in the middle of the file ({e})") from None
            if not complete:  # a row without its newline: the write was cut short; redo it
                break
            rid = str(row["id"])
            if rid not in wanted:
                raise DataError(f"{path}:{lineno}: id {rid!r} is not in the input (output of other data?)")
            if rid in done:
                raise DataError(f"{path}:{lineno}: duplicate id {rid!r}")
            done[rid] = row
        pos = good_end = end
    if good_end < len(data):
        log.warning("%s: dropping a partially written last line (%d bytes) before resuming",
                    path, len(data) - good_end)
        with path.open("r+b") as f:
            f.truncate(good_end)
    return done


def stats_of_rows(rows: Sequence[dict[str, Any]]) -> CotGenStats:
    """Totals over output rows (their `cot_gen` counts)."""
    stats = CotGenStats(examples=len(rows))
    for row in rows:
        if row.get("rationale"):
            stats.with_rationale += 1
        else:
            stats.without_rationale += 1
        for key in _COUNT_KEYS:
            setattr(stats, key, getattr(stats, key) + int((row.get("cot_gen") or {}).get(key, 0)))
    return stats


def _finish(rows: list[dict[str, Any]], out: Path, generated_now: int, resumed: int) -> CotGenStats:
    write_jsonl(rows, out)  # input order, atomic
    stats = dataclasses.replace(stats_of_rows(rows), generated_now=generated_now, resumed=resumed)
    stats_path(out).write_text(json.dumps(dataclasses.asdict(stats), indent=2) + "\n", encoding="utf-8")
    log.info("%s -> %s", stats.summary(), out)
    return stats


def generate_rationales(examples: Sequence[Example], generate_fn: GenerateFn, cfg: CotGenConfig, out: Path, *,
                        rank: int = 0, world_size: int = 1, seed: int = 0,
                        sort_key: Callable[[str], int] = len,
                        on_batch: Callable[[int, list[str]], None] | None = None) -> CotGenStats:
    """Generate rationales for this rank's shard of `examples` into `out`, resuming what it holds.

    Examples are sorted by `sort_key(CoT prompt)` (prompt length) and generated in batches of
    `cfg.batch_size` prompts; each batch is appended to `out` and flushed, then `on_batch(batch index,
    ids written)` is called. At the end `out` is rewritten in input order. Returns the counts.
    """
    out = Path(out)
    mine = shard_examples(examples, rank, world_size)
    done = load_done(out, {ex.id for ex in mine})
    todo = sorted((ex for ex in mine if ex.id not in done), key=lambda ex: sort_key(cot_prompt(ex)))
    if done:
        log.info("%s: resuming, %d of %d examples already done", out, len(done), len(mine))
    per_batch = max(1, cfg.batch_size // cfg.samples_per_example)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        for b, start in enumerate(range(0, len(todo), per_batch)):
            chunk = todo[start : start + per_batch]
            for ex, (found, counts) in zip(chunk, rationales_for(chunk, generate_fn, cfg, seed), strict=True):
                row = example_row(ex, found, counts, cfg.samples_per_example)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[ex.id] = row
            f.flush()
            os.fsync(f.fileno())
            log.info("generate-cot: %d / %d examples", len(done), len(mine))
            if on_batch is not None:
                on_batch(b, [ex.id for ex in chunk])
    return _finish([done[ex.id] for ex in mine], out, len(todo), len(mine) - len(todo))


def merge_shards(examples: Sequence[Example], shards: Sequence[Path], out: Path) -> CotGenStats:
    """Merge the ranks' complete shard files into `out`, in the order of `examples`; returns the counts."""
    rows: dict[str, dict[str, Any]] = {}
    for path in shards:
        if not path.is_file():
            raise DataError(f"{path}: shard file does not exist (did every rank finish?)")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                if str(row["id"]) in rows:
                    raise DataError(f"{path}:{lineno}: id {row['id']!r} is in more than one shard")
                rows[str(row["id"])] = row
    missing = [ex.id for ex in examples if ex.id not in rows]
    if missing:
        raise DataError(f"{len(missing)} examples have no row in the shards (first: {missing[0]!r})")
    if len(rows) != len(examples):
        raise DataError(f"the shards hold {len(rows) - len(examples)} rows of other data")
    return _finish([rows[ex.id] for ex in examples], out, 0, len(examples))


# ----------------------------------------------------------------------------- the teacher


def hf_generate_fn(model: PreTrainedModel, tok: PreTrainedTokenizerBase, cfg: CotGenConfig) -> GenerateFn:
    """A GenerateFn over `evaluate.generate` (batched, left-padded, length-sorted, KV cache) with cfg's
    sampling; prompts go through the chat template per `cfg.chat_template` (`data.prompts`)."""
    ecfg = EvalConfig(decoding="sample" if cfg.temperature > 0 else "greedy", temperature=cfg.temperature or 1.0,
                      top_p=cfg.top_p, top_k=0, no_repeat_ngram_size=0, max_new_tokens=cfg.max_new_tokens,
                      batch_size=cfg.batch_size)
    gen_tok = generation_tokenizer(tok, cfg.chat_template)

    def fn(prompts: list[str], seed: int) -> list[str]:
        by_index = generate(model, gen_tok, prompts, ecfg, seed)
        return [by_index[i] for i in range(len(prompts))]

    return fn


def vllm_generate_fn(model_dir: Path, tok: PreTrainedTokenizerBase, cfg: CotGenConfig) -> GenerateFn:
    """A GenerateFn over vLLM (`cot.backend=vllm`): the same chat-templated prompt ids as the hf
    backend, the same sampling settings, one request per prompt seeded from the call's seed."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ImportError("cot.backend=vllm needs vLLM (a GPU package): pip install vllm, or use "
                          "cot.backend=hf") from None
    gen_tok = generation_tokenizer(tok, cfg.chat_template)
    llm = LLM(model=str(model_dir), tokenizer=str(model_dir), seed=0)

    def fn(prompts: list[str], seed: int) -> list[str]:
        params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                 seed=seed + i, stop_token_ids=[gen_tok.eos_token_id]) for i in range(len(prompts))]
        requests = [{"prompt_token_ids": model_input_ids(gen_tok, p, "auto")} for p in prompts]
        return [out.outputs[0].text for out in llm.generate(requests, params, use_tqdm=False)]

    return fn


class LazyTeacher:
    """A GenerateFn that loads the teacher on its first call (a finished output needs no model)."""

    def __init__(self, model_dir: Path, dtype: str, tok: PreTrainedTokenizerBase, cfg: CotGenConfig) -> None:
        self.model_dir, self.dtype, self.tok, self.cfg = model_dir, dtype, tok, cfg
        self.fn: GenerateFn | None = None

    def __call__(self, prompts: list[str], seed: int) -> list[str]:
        if self.fn is None:
            if self.cfg.backend == "vllm":
                self.fn = vllm_generate_fn(self.model_dir, self.tok, self.cfg)
            else:
                self.fn = hf_generate_fn(load_model(self.model_dir, self.dtype), self.tok, self.cfg)
        return self.fn(prompts, seed)
