"""Training records (CoT pairing), dual tokenization with response masks, and collation.

Records (`data.pairing`, docs/method.md section 2): by default ("reference", the CoT2Align
reference data builder) EVERY example yields its standard record, main = (standard prompt, gold
output), and an example with a rationale ADDS a paired record, main = (CoT prompt, CoT target)
and aux = (standard prompt, gold output). Every member is tokenized separately by the student's
AND the teacher's tokenizer; labels are -100 on prompt tokens and padding.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from cot2align.configbase import ConfigBase, require
from cot2align.data.jsonl import DataError, Example
from cot2align.data.prompts import cot_prompt, cot_target, std_prompt

IGNORE = -100
SIDES = ("student", "teacher")


@dataclass
class DataConfig(ConfigBase):
    """Data files, pairing and tokenization (`data.*`)."""

    train_file: str = ""
    """Training JSONL ('' = the embedded task's train split)."""
    dev_file: str = ""
    """Dev JSONL ('' = the embedded task's dev split)."""
    test_file: str = ""
    """Test JSONL ('' = the embedded task's test split)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row stops the run (naming file:line) or is skipped and counted."""
    use_cot: bool = True
    """Use rationales (CoT members); false trains on std samples only."""
    pairing: Literal["reference", "pair", "separate"] = "reference"
    """Records of an example with a rationale. reference: its std record (main = std) AND a paired
    record (main = CoT, aux = std), as the CoT2Align reference; pair: the paired record only (its
    std answer gets no CE / KD); separate: a CoT record and a std record, never paired (teacher SFT)."""
    max_length: int = 256
    """Maximum prompt + response tokens per sequence (each tokenizer)."""
    max_prompt_length: int = 128
    """Maximum prompt tokens; longer prompts keep their END (the response header)."""
    on_overlength: Literal["truncate", "skip", "error"] = "truncate"
    """Sequences over the limits are truncated (counted), skipped (counted) or an error."""
    add_eos: bool = True
    """Append the tokenizer's EOS token to every response."""

    def check(self, prefix: str) -> None:
        require(self.max_length >= 4, f"{prefix}.max_length", f"must be >= 4, got {self.max_length}")
        require(
            1 <= self.max_prompt_length < self.max_length,
            f"{prefix}.max_prompt_length",
            f"must be in [1, max_length={self.max_length}), got {self.max_prompt_length}",
        )


class Tokenizer(Protocol):
    """The part of an HF tokenizer used here."""

    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class Sequence:
    """One tokenized (prompt, response): ids = prompt ids + response ids."""

    ids: list[int]
    prompt_len: int


@dataclass
class Sample:
    """One training record after pairing and dual tokenization (an example yields one or two).

    seqs[side][fmt]: side in ("student", "teacher"), fmt in ("main", "aux"); "aux" only when paired.
    """

    index: int
    id: str
    paired: bool
    seqs: dict[str, dict[str, Sequence]]


@dataclass
class TokenizeReport:
    """Counts of what tokenization changed or dropped, by reason and side."""

    samples: int = 0
    paired: int = 0
    truncated: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, object]:
        return {"samples": self.samples, "paired": self.paired,
                "truncated": dict(self.truncated), "skipped": dict(self.skipped)}


class OverlengthError(DataError):
    """A sequence is over the configured length limits and data.on_overlength=error."""


def tokenize_member(
    tok: Tokenizer, prompt: str, response: str, cfg: DataConfig, where: str, report: TokenizeReport, side: str
) -> Sequence:
    """Tokenize prompt and response separately (prompt ids never depend on the response).

    Truncation keeps the prompt's end and the response's start; the response keeps >= 1 token.
    """
    p = tok.encode(prompt, add_special_tokens=False)
    if tok.bos_token_id is not None:
        p = [tok.bos_token_id, *p]
    r = tok.encode(response, add_special_tokens=False)
    if cfg.add_eos and tok.eos_token_id is not None:
        r = [*r, tok.eos_token_id]
    if not r:
        raise DataError(f"{where}: the {side} tokenizer gives an empty response")
    over_prompt = len(p) > cfg.max_prompt_length
    over_total = len(p[-cfg.max_prompt_length :]) + len(r) > cfg.max_length
    if over_prompt or over_total:
        what = (f"{side}: prompt {len(p)} tokens (max_prompt_length {cfg.max_prompt_length}), "
                f"prompt + response {len(p) + len(r)} tokens (max_length {cfg.max_length})")
        if cfg.on_overlength == "error":
            raise OverlengthError(f"{where}: sequence over the length limit: {what} "
                                  "(raise data.max_length / data.max_prompt_length or set data.on_overlength)")
        if cfg.on_overlength == "skip":
            raise OverlengthError(f"{where}: skipped, over the length limit: {what}")
        if over_prompt:
            report.truncated[f"{side}_prompt"] += 1
            p = p[-cfg.max_prompt_length :]
        if len(p) + len(r) > cfg.max_length:
            report.truncated[f"{side}_response"] += 1
            r = r[: cfg.max_length - len(p)]
    return Sequence(ids=p + r, prompt_len=len(p))


def build_samples(
    examples: list[Example], student_tok: Tokenizer, teacher_tok: Tokenizer, cfg: DataConfig
) -> tuple[list[Sample], TokenizeReport]:
    """Records of `examples` (see `DataConfig.pairing`), dual-tokenized, in example order (an example's
    std record before its paired one). Records skipped for length (on_overlength=skip) are counted."""
    report = TokenizeReport()
    samples: list[Sample] = []
    toks = {"student": student_tok, "teacher": teacher_tok}
    for ex in examples:
        std = (std_prompt(ex), ex.output)
        groups: list[dict[str, tuple[str, str]]]
        if cfg.use_cot and ex.rationale is not None:
            cot = (cot_prompt(ex), cot_target(ex.rationale, ex.output))
            groups = {"reference": [{"main": std}, {"main": cot, "aux": std}],
                      "pair": [{"main": cot, "aux": std}],
                      "separate": [{"main": cot}, {"main": std}]}[cfg.pairing]
        else:
            groups = [{"main": std}]
        for members in groups:
            try:
                seqs = {
                    side: {fmt: tokenize_member(tok, p, r, cfg, f"{ex.source or 'example'} (id {ex.id}, {fmt})", report, side)
                           for fmt, (p, r) in members.items()}
                    for side, tok in toks.items()
                }
            except OverlengthError:
                if cfg.on_overlength == "skip":
                    report.skipped["over_length"] += 1
                    continue
                raise
            paired = "aux" in members
            samples.append(Sample(index=len(samples), id=ex.id, paired=paired, seqs=seqs))
            report.paired += int(paired)
    report.samples = len(samples)
    if not samples:
        raise DataError(f"no samples left after tokenization ({report.summary()})")
    return samples, report


@dataclass
class SeqBatch:
    """One model's padded batch of one format (right padding).

    input_ids [B, T] long; attention_mask [B, T] long; labels [B, T] long (-100 off-response);
    resp_index [B, N] long: input positions t whose next token is a response token
    (left-aligned, padded with 0); resp_mask [B, N] bool.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    resp_index: Tensor
    resp_mask: Tensor

    @property
    def targets(self) -> Tensor:
        """[B, N] long: the token predicted at each response position (0 on padding)."""
        nxt = torch.gather(self.input_ids, 1, (self.resp_index + 1).clamp(max=self.input_ids.shape[1] - 1))
        return nxt * self.resp_mask

    @property
    def inputs(self) -> Tensor:
        """[B, N] long: the input token at each response position (0 on padding)."""
        return torch.gather(self.input_ids, 1, self.resp_index) * self.resp_mask

    def to(self, device: torch.device | str) -> SeqBatch:
        return SeqBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                    self.resp_index, self.resp_mask)))


@dataclass
class Batch:
    """A collated micro-batch: seqs[side][fmt] -> SeqBatch; aux rows of unpaired samples are
    1-token dummies with an all-False response mask."""

    indices: list[int]
    paired: Tensor
    seqs: dict[str, dict[str, SeqBatch]]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.indices, self.paired.to(device),
                     {s: {f: b.to(device) for f, b in d.items()} for s, d in self.seqs.items()})


def _pad_side(seqs: list[Sequence | None], pad_id: int) -> SeqBatch:
    B = len(seqs)
    T = max(len(s.ids) if s is not None else 1 for s in seqs)
    N = max(len(s.ids) - s.prompt_len if s is not None else 0 for s in seqs)
    N = max(N, 1)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    resp_index = torch.zeros((B, N), dtype=torch.long)
    resp_mask = torch.zeros((B, N), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s is None:
            att[i, 0] = 1
            continue
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids)
        att[i, :n] = 1
        labels[i, s.prompt_len : n] = ids[i, s.prompt_len : n]
        k = n - s.prompt_len
        resp_index[i, :k] = torch.arange(s.prompt_len - 1, n - 1)
        resp_mask[i, :k] = True
    return SeqBatch(ids, att, labels, resp_index, resp_mask)


def collate(samples: list[Sample], pad_ids: dict[str, int], fmts: list[str] | tuple[str, ...] | None = None) -> Batch:
    """Pad a list of samples into a Batch.

    fmts None: "aux" is present when any sample is paired. Given (e.g. the step's formats): exactly
    those formats, "aux" made of 1-token dummy rows where a sample is unpaired, so every micro-batch
    runs the same forward passes whatever its records (what ZeRO-3's collective gathers need).
    """
    paired = torch.tensor([s.paired for s in samples], dtype=torch.bool)
    if fmts is None:
        fmts = ["main", "aux"] if bool(paired.any()) else ["main"]
    seqs = {
        side: {fmt: _pad_side([s.seqs[side].get(fmt) for s in samples], pad_ids[side]) for fmt in fmts}
        for side in SIDES
    }
    return Batch([s.index for s in samples], paired, seqs)
