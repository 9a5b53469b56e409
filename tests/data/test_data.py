"""JSONL reading, CoT pairing, dual tokenization with response masks, collation, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cot2align.data.dataset import DataConfig, OverlengthError, build_samples, collate
from cot2align.data.jsonl import DataError, read_jsonl
from cot2align.data.prompts import ANSWER_BRIDGE, cot_prompt, std_prompt
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.losses import LossConfig, LossContext, build_loss
from cot2align.losses.base import LossInputs, ResponseView
from cot2align.models import load_tokenizer

GOOD = {"instruction": "Add 2 and 3.", "input": "", "output": "5", "rationale": "2 + 3 = 5."}


def _write(tmp: Path, lines: list[bytes]) -> Path:
    p = tmp / "d.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


@pytest.mark.parametrize(
    "line, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (json.dumps({"output": "5"}).encode(), "missing field 'instruction'"),
        (json.dumps({"instruction": "x", "output": "  "}).encode(), "field 'output' is empty"),
        (json.dumps({"instruction": 3, "output": "5"}).encode(), "field 'instruction' must be a string"),
        (json.dumps({"instruction": "x", "output": "5", "rationale": ""}).encode(), "field 'rationale' is empty"),
        (b'{"instruction": "\xff\xfe", "output": "5"}', "not valid UTF-8"),
        (json.dumps({**GOOD, "rationale": 7}).encode(), "field 'rationale' must be a string, got int (7)"),
        (json.dumps({**GOOD, "input": 2.5}).encode(), "field 'input' must be a string, got float"),
        (json.dumps({**GOOD, "answer": [5]}).encode(), "field 'answer' must be a string or a number, got list"),
        (json.dumps({**GOOD, "id": True}).encode(), "field 'id' must be a string or a number, got bool"),
        (b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), "not valid JSON"),  # a BOM is skipped on line 1 only
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, line: bytes, message: str) -> None:
    p = _write(tmp_path, [json.dumps(GOOD).encode(), line])
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert f"{p}:2: {message}" in str(e.value)


def test_utf8_bom_and_numeric_id_and_answer(tmp_path: Path) -> None:
    """A file starting with a UTF-8 BOM loads (its first row intact); numbers in id / answer are
    coerced to their decimal text."""
    p = _write(tmp_path, [b"\xef\xbb\xbf" + json.dumps({**GOOD, "id": 7, "answer": 5}).encode(),
                          json.dumps({**GOOD, "id": "x", "answer": 2.5}).encode()])
    examples, _ = read_jsonl(p)
    assert [(e.id, e.answer, e.instruction) for e in examples] == [("7", "5", GOOD["instruction"]),
                                                                  ("x", "2.5", GOOD["instruction"])]
    assert examples[0].meta == {}


def test_bad_rows_skipped_and_counted(tmp_path: Path) -> None:
    rows = [json.dumps({**GOOD, "id": str(i)}).encode() for i in range(3)]
    p = _write(tmp_path, [rows[0], b"{oops", rows[1], json.dumps({"instruction": "x"}).encode(), b"", rows[2]])
    examples, report = read_jsonl(p, on_bad_row="skip")
    assert [e.id for e in examples] == ["0", "1", "2"]
    assert report.kept == 3 and report.total_skipped == 2
    assert sum(v for k, v in report.skipped.items() if "JSON" in k) == 1


def test_duplicate_ids_and_empty_file(tmp_path: Path) -> None:
    p = _write(tmp_path, [json.dumps({**GOOD, "id": "a"}).encode()] * 2)
    with pytest.raises(DataError, match=r":2: duplicate id 'a' \(first on line 1\)"):
        read_jsonl(p)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        read_jsonl(empty)


def test_pairs_have_nonempty_masks_on_both_tokenizers(tiny_task: dict[str, Path]) -> None:
    """The reference code's bug (empty teacher std mask) must not exist: every Cross-CoT pair is non-empty."""
    examples, _ = read_jsonl(tiny_task["train"])
    s_tok, t_tok = load_tokenizer(tiny_task["tok_student"]), load_tokenizer(tiny_task["tok_teacher"])
    assert s_tok.get_vocab() != t_tok.get_vocab()
    samples, report = build_samples(examples[:12], s_tok, t_tok,
                                    DataConfig(max_length=512, max_prompt_length=256, pairing="pair"))
    assert report.paired == 12 and not report.truncated
    batch = collate(samples, {"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id})
    for side, tok in (("student", s_tok), ("teacher", t_tok)):
        for fmt in ("main", "aux"):
            sb = batch.seqs[side][fmt]
            assert bool(sb.resp_mask.sum(1).gt(0).all()), (side, fmt)
            # response positions predict exactly the labelled tokens, nothing else
            for i, s in enumerate(samples):
                seq = s.seqs[side][fmt]
                n = int(sb.resp_mask[i].sum())
                assert n == len(seq.ids) - seq.prompt_len
                assert sb.targets[i, :n].tolist() == seq.ids[seq.prompt_len :]
                assert sb.labels[i][sb.labels[i] != -100].tolist() == seq.ids[seq.prompt_len :]
                assert sb.inputs[i, :n].tolist() == seq.ids[seq.prompt_len - 1 : -1]
        # the texts behind the masks: main is the CoT member, aux the gold output
        main = samples[0].seqs[side]["main"]
        aux = samples[0].seqs[side]["aux"]
        main_text = tok.decode(main.ids[main.prompt_len :], skip_special_tokens=True)
        aux_text = tok.decode(aux.ids[aux.prompt_len :], skip_special_tokens=True)
        assert "answer is" in main_text.lower() and examples[0].output in main_text
        assert aux_text.strip() == examples[0].output
    # the four members the three OT pairs use are all non-empty
    for (s_fmt, t_fmt) in (("main", "main"), ("aux", "main"), ("main", "aux")):
        assert bool((batch.seqs["student"][s_fmt].resp_mask.any(1) & batch.seqs["teacher"][t_fmt].resp_mask.any(1)).all())


def test_reference_records_train_the_standard_answer_of_a_paired_example(tiny_task: dict[str, Path]) -> None:
    """Default records: the paired example 0 gives its std record (CE on the gold answer) AND the paired
    record; the example without a rationale gives its std record. CE of the loss = CE over both mains."""
    examples, _ = read_jsonl(tiny_task["train"])
    tok = load_tokenizer(tiny_task["tok_teacher"])
    mixed = [examples[0], examples[1].__class__(**{**examples[1].__dict__, "rationale": None})]
    cfg = DataConfig(max_length=512, max_prompt_length=256)
    assert cfg.pairing == "reference"
    samples, report = build_samples(mixed, tok, tok, cfg)
    assert [(s.id, s.paired) for s in samples] == [(mixed[0].id, False), (mixed[0].id, True), (mixed[1].id, False)]
    assert report.paired == 1 and report.samples == 3
    std = samples[0].seqs["student"]["main"]
    assert std.ids[: std.prompt_len] == [tok.bos_token_id, *tok.encode(std_prompt(mixed[0]), add_special_tokens=False)]
    assert tok.decode(std.ids[std.prompt_len :], skip_special_tokens=True).strip() == mixed[0].output
    assert samples[1].seqs["student"]["aux"].ids == std.ids  # the paired record's aux is the same std member
    # the loss: CE covers the std answer of the paired example (its gradient reaches those positions)
    batch = collate(samples, {"student": tok.pad_token_id, "teacher": tok.pad_token_id})
    main = batch.seqs["student"]["main"]
    view = ResponseView(hidden={}, mask=main.resp_mask, inputs=main.inputs, targets=main.targets)
    logits = torch.randn(*main.resp_mask.shape, len(tok), dtype=torch.float64, requires_grad=True)
    n_tok = float(main.resp_mask.sum())
    inputs = LossInputs(student={"main": view}, teacher={}, student_logits=logits, student_final=1, teacher_final=1,
                        student_head=lambda h: h, teacher_head=lambda h: h, student_embed=lambda x: x,
                        teacher_embed=lambda x: x, num_tokens=n_tok, num_examples=3.0)
    d = 4
    out = build_loss(LossConfig(name="sft"), LossContext(d, d, len(tok), len(tok), True))(inputs)
    m = main.resp_mask
    ref = torch.nn.functional.cross_entropy(logits[m], main.targets[m], reduction="sum") / n_tok
    torch.testing.assert_close(out.total, ref.float(), rtol=1e-6, atol=0)
    (g,) = torch.autograd.grad(out.total, [logits])
    n_std = len(std.ids) - std.prompt_len
    assert bool(g[0, :n_std].abs().sum(-1).gt(0).all())


def test_prompt_ids_do_not_depend_on_response(tiny_task: dict[str, Path]) -> None:
    examples, _ = read_jsonl(tiny_task["train"])
    tok = load_tokenizer(tiny_task["tok_teacher"])
    samples, _ = build_samples(examples[:3], tok, tok, DataConfig(max_length=512, max_prompt_length=256, pairing="pair"))
    for ex, s in zip(examples, samples):
        main = s.seqs["teacher"]["main"]
        assert main.ids[: main.prompt_len] == [tok.bos_token_id, *tok.encode(cot_prompt(ex), add_special_tokens=False)]
        aux = s.seqs["teacher"]["aux"]
        assert aux.ids[: aux.prompt_len] == [tok.bos_token_id, *tok.encode(std_prompt(ex), add_special_tokens=False)]
        assert aux.ids[-1] == tok.eos_token_id


def test_unpaired_and_mixed_batches(tiny_task: dict[str, Path]) -> None:
    examples, _ = read_jsonl(tiny_task["train"])
    tok = load_tokenizer(tiny_task["tok_teacher"])
    mixed = [examples[0], examples[1].__class__(**{**examples[1].__dict__, "rationale": None})]
    samples, report = build_samples(mixed, tok, tok, DataConfig(max_length=512, max_prompt_length=256, pairing="pair"))
    assert [s.paired for s in samples] == [True, False] and report.paired == 1
    batch = collate(samples, {"student": 0, "teacher": 0})
    assert batch.seqs["student"]["aux"].resp_mask[1].sum() == 0
    assert batch.seqs["student"]["aux"].resp_mask[0].sum() > 0
    sep, _ = build_samples(mixed, tok, tok, DataConfig(max_length=512, max_prompt_length=256, pairing="separate"))
    assert len(sep) == 3 and not any(s.paired for s in sep)
    nocot, _ = build_samples(mixed, tok, tok, DataConfig(max_length=512, max_prompt_length=256, use_cot=False))
    assert len(nocot) == 2 and not any(s.paired for s in nocot)
    assert ANSWER_BRIDGE.strip() not in tok.decode(nocot[0].seqs["teacher"]["main"].ids)


def test_collate_with_the_steps_formats_always_has_aux(tiny_task: dict[str, Path]) -> None:
    """A micro-batch of unpaired records still gets an (all-dummy) aux format when the step runs aux, so
    every ZeRO-3 replica runs the same forward passes."""
    examples, _ = read_jsonl(tiny_task["train"])
    tok = load_tokenizer(tiny_task["tok_teacher"])
    samples, _ = build_samples(examples[:2], tok, tok, DataConfig(max_length=512, max_prompt_length=256))
    unpaired = [s for s in samples if not s.paired]
    assert set(collate(unpaired, {"student": 0, "teacher": 0}).seqs["student"]) == {"main"}
    batch = collate(unpaired, {"student": 0, "teacher": 0}, ["main", "aux"])
    for side in ("student", "teacher"):
        aux = batch.seqs[side]["aux"]
        assert aux.input_ids.shape == (2, 1) and not bool(aux.resp_mask.any())
    paired = collate(samples, {"student": 0, "teacher": 0})
    assert set(paired.seqs["student"]) == {"main", "aux"}
    assert set(collate(samples, {"student": 0, "teacher": 0}, ["main"]).seqs["teacher"]) == {"main"}


def test_truncation_counted_skipped_or_error(tiny_task: dict[str, Path]) -> None:
    examples, _ = read_jsonl(tiny_task["train"])
    tok = load_tokenizer(tiny_task["tok_teacher"])
    cfg = DataConfig(max_length=40, max_prompt_length=30)
    samples, report = build_samples(examples[:4], tok, tok, cfg)
    assert report.truncated["teacher_prompt"] > 0
    for s in samples:
        for seq in s.seqs["teacher"].values():
            assert len(seq.ids) <= 40 and seq.prompt_len <= 30 and len(seq.ids) > seq.prompt_len
    with pytest.raises(OverlengthError, match=r"train.jsonl:1 \(id \S+, main\): sequence over the length limit: student: prompt \d+ tokens"):
        build_samples(examples[:4], tok, tok, DataConfig(max_length=40, max_prompt_length=30, on_overlength="error"))
    with pytest.raises(DataError, match="no samples left"):
        build_samples(examples[:4], tok, tok, DataConfig(max_length=40, max_prompt_length=30, on_overlength="skip"))


def test_sampler_deterministic_disjoint_and_resumable() -> None:
    s = GlobalBatchSampler(50, micro_batch=3, accum=2, dp=2, seed=7)
    assert s.steps_per_epoch == 4 and s.dropped_per_epoch == 2
    seen: list[int] = []
    for step in range(s.steps_per_epoch):
        for r in range(2):
            for mb in s.micro_batches(step, r):
                assert len(mb) == 3
                seen += mb
    assert len(seen) == len(set(seen)) == 48
    again = GlobalBatchSampler(50, 3, 2, 2, seed=7)
    assert again.micro_batches(5, 1) == s.micro_batches(5, 1)  # any step, any order: pure function of (seed, step)
    assert s.micro_batches(0, 0) != s.micro_batches(4, 0)  # a new epoch reshuffles
    assert GlobalBatchSampler(50, 3, 2, 2, seed=8).micro_batches(0, 0) != s.micro_batches(0, 0)
    with pytest.raises(ValueError, match="cannot fill one global batch of 12"):
        GlobalBatchSampler(10, 3, 2, 2, seed=0)


def test_collate_padding_is_right_and_masked(tiny_task: dict[str, Path]) -> None:
    examples, _ = read_jsonl(tiny_task["train"])
    tok = load_tokenizer(tiny_task["tok_student"])
    samples, _ = build_samples(examples[:5], tok, tok, DataConfig(max_length=512, max_prompt_length=256))
    b = collate(samples, {"student": tok.pad_token_id, "teacher": tok.pad_token_id}).seqs["student"]["main"]
    lens = torch.tensor([len(s.seqs["student"]["main"].ids) for s in samples])
    assert b.attention_mask.sum(1).tolist() == lens.tolist()
    assert bool((b.input_ids[b.attention_mask == 0] == tok.pad_token_id).all())
    assert bool((b.labels[b.attention_mask == 0] == -100).all())
