"""MinED and ULD on real production tokenizers (gpt-2 50,257 / qwen2 151,936 / phi-3 32,064).

Needs the tokenizers prepared by `python scripts/prepare_test_assets.py` under
.cache/test-assets/tokenizers; skipped with a reason when they are absent.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from loss_fixtures import Case, assert_close, config, grads, make_case

from cot2align.configbase import REPO_ROOT
from cot2align.losses.mined import MinED
from cot2align.losses.uld import ULD

pytestmark = pytest.mark.assets

ROOT = REPO_ROOT / ".cache" / "test-assets" / "tokenizers"
SENTENCES = [
    "Let's think step by step. Natalia sold 48 clips in April, and then she sold half as many in May.",
    "Therefore, the answer is: 72.\nThe café served naïve customers 1234 croissants!",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
]


def _load(name: str) -> Any:
    folder = ROOT / name
    if not (folder / ".prepared").exists():
        pytest.skip(f"real tokenizer {name!r} not prepared: run `python scripts/prepare_test_assets.py` ({folder})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module", params=[("gpt-2", "qwen2"), ("gpt-2", "phi-3")], ids=lambda p: f"{p[0]}<-{p[1]}")
def pair(request: pytest.FixtureRequest) -> tuple[Any, Any, MinED]:
    student, teacher = _load(request.param[0]), _load(request.param[1])
    case = _case(student, teacher, SENTENCES[:1])
    return student, teacher, MinED(config(name="mined", temperature=1.0, token_chunk=16), case.ctx)


def _case(student: Any, teacher: Any, texts: list[str], **kw: Any) -> Case:
    s_ids = [student(t, add_special_tokens=False)["input_ids"] + [student.eos_token_id] for t in texts]
    t_ids = [teacher(t, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id] for t in texts]
    return make_case(
        s_len=[len(x) - 1 for x in s_ids], t_len=[len(x) - 1 for x in t_ids], s_ids=s_ids, t_ids=t_ids,
        v_s=len(student), v_t=len(teacher), d_s=4, d_t=4, student_tokenizer=student, teacher_tokenizer=teacher,
        **kw,
    )


def test_id_map_matches_real_pieces(pair: tuple[Any, Any, MinED]) -> None:
    student, teacher, loss = pair
    the_s = student.convert_tokens_to_ids("Ġthe")
    the_t = teacher.convert_tokens_to_ids("Ġthe" if "Ġthe" in teacher.get_vocab() else "▁the")
    assert loss.id_map[the_t] == the_s
    newline_t = teacher.convert_tokens_to_ids("Ċ" if "Ċ" in teacher.get_vocab() else "<0x0A>")
    assert loss.id_map[newline_t] == student.convert_tokens_to_ids("Ċ")
    assert loss.id_map[teacher.eos_token_id] == student.eos_token_id
    mapped = sum(s >= 0 for s in loss.id_map)
    assert mapped > 0.3 * len(student)  # a large share of the student vocabulary is reachable
    for t_id in (the_t, newline_t, teacher.convert_tokens_to_ids(teacher.tokenize(" step")[0])):
        s_id = loss.id_map[t_id]
        assert s_id >= 0 and loss.student_table.surface[s_id] == loss.teacher_table.surface[t_id]


def test_alignment_pairs_identical_text(pair: tuple[Any, Any, MinED]) -> None:
    student, teacher, loss = pair
    twins = paired = 0
    for text in SENTENCES:
        s_ids = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
        t_ids = teacher(text, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
        pairs = loss.align_row(s_ids, t_ids)
        assert (len(s_ids) - 1, len(t_ids) - 1) in pairs  # end of sequence aligned to end of sequence
        same = [loss.student_table.align[s_ids[i]] == loss.teacher_table.align[t_ids[j]] for i, j in pairs]
        assert sum(same) >= 0.9 * len(pairs) and len(pairs) >= 0.5 * len(s_ids)
        # whole words that both tokenizers keep as one piece are paired with each other (edit-distance
        # DTW may still give one away to a long neighbour, hence the 80 %)
        for word in (b" step", b" sold", b" the", b" response"):
            s_pos = [i for i, x in enumerate(s_ids) if loss.student_table.surface[x] == word]
            t_pos = [j for j, x in enumerate(t_ids) if loss.teacher_table.surface[x] == word]
            if len(s_pos) == len(t_pos):
                twins += len(s_pos)
                paired += sum((i, j) in pairs for i, j in zip(s_pos, t_pos))
    assert twins >= 5 and paired >= 0.8 * twins


def test_mined_loss_is_finite_with_gradient(pair: tuple[Any, Any, MinED]) -> None:
    student, teacher, loss = pair
    case = _case(student, teacher, SENTENCES[:2], seed=3)
    total, parts = loss(case.inputs)
    (g,) = grads(total, [case.s_logits])
    assert torch.isfinite(total) and torch.isfinite(g).all() and g.abs().sum() > 0
    assert float(parts["aligned_frac"]) > 0.5


def test_uld_on_real_vocab_sizes(pair: tuple[Any, Any, MinED]) -> None:
    student, teacher, _ = pair
    case = _case(student, teacher, SENTENCES[1:2], seed=4)
    uld, _ = ULD(config(name="uld", temperature=1.0, token_chunk=8), case.ctx)(case.inputs)
    (g,) = grads(uld, [case.s_logits])
    assert torch.isfinite(uld) and torch.isfinite(g).all() and g.abs().sum() > 0
    k = min(case.s_len[0], case.t_len[0])
    p_s = torch.softmax(case.s_logits[0, :k], -1).sort(-1, descending=True).values
    p_t = torch.softmax(case.t_hidden[0, :k] @ case.W_t.T, -1).sort(-1, descending=True).values
    w = max(p_s.shape[-1], p_t.shape[-1])
    ref = (
        torch.nn.functional.pad(p_s, (0, w - p_s.shape[-1])) - torch.nn.functional.pad(p_t, (0, w - p_t.shape[-1]))
    ).abs().sum() / case.inputs.num_tokens
    assert_close(uld, ref, rtol=1e-9, what="uld")
