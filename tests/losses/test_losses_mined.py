"""MinED: token surfaces, id map (and its cache), DTW alignment, and the loss against a float64 reference."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from loss_fixtures import CORPUS, Case, assert_close, config, grads, make_case, train_tokenizers

from cot2align.data import token_alignment as alignment_mod
from cot2align.data.token_alignment import (
    TokenTable,
    _offsets,
    _surface,
    dtw_align,
    levenshtein,
    one_to_one,
    overlapping,
)
from cot2align.losses.mined import MinED
from cot2align.losses.registry import Distiller, build_loss


@pytest.fixture(scope="module")
def toks() -> tuple[Any, Any]:
    return train_tokenizers()


# ----------------------------------------------------------------------------- surfaces and id map
def test_surfaces_of_each_tokenizer_family(toks: tuple[Any, Any]) -> None:
    student, teacher = toks
    s_tab = TokenTable.from_tokenizer(student)
    t_tab = TokenTable.from_tokenizer(teacher)
    s_the = student.convert_tokens_to_ids("Ġthe")
    t_the = teacher.convert_tokens_to_ids("▁the")
    assert s_tab.surface[s_the] == b" the" and s_tab.align[s_the] == b"the"
    assert t_tab.surface[t_the] == b" the" and t_tab.align[t_the] == b"the"
    assert s_tab.special[student.eos_token_id] and s_tab.surface[student.eos_token_id] == b"<|endoftext|>"
    assert s_tab.surface[student.convert_tokens_to_ids("Ċ")] == b"\n"
    # WordPiece, SentencePiece byte fallback and raw byte-level pieces
    assert _surface("##ing", False, True, "##", None) == b"ing"
    assert _surface("the", False, True, "##", None) == b" the"
    assert _surface("<0x0A>", False, False, None, None) == b"\n"
    assert _surface("Ã©", True, False, None, None) == "é".encode()
    assert _surface("Ġ", True, False, None, None) == b" "
    assert _surface("â", True, False, None, None) == b"\xe2"  # a lone UTF-8 lead byte


def test_wordpiece_tokenizer_table() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[SEP]": 1, "the": 2, "##re": 3, "play": 4, "##ing": 5}
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", sep_token="[SEP]")
    tab = TokenTable.from_tokenizer(tok)
    assert tab.surface[2] == b" the" and tab.surface[3] == b"re" and tab.surface[5] == b"ing"
    assert tab.special[0] and tab.special[1]


def test_id_map_and_its_cache(toks: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    student, teacher = toks
    case = make_case(s_len=[2], v_s=len(student), v_t=len(teacher), student_tokenizer=student, teacher_tokenizer=teacher)
    case.ctx.cache_dir = str(tmp_path)
    loss = MinED(config(name="mined"), case.ctx)
    t_the, s_the = teacher.convert_tokens_to_ids("▁the"), student.convert_tokens_to_ids("Ġthe")
    assert loss.id_map[t_the] == s_the
    assert loss.id_map[teacher.eos_token_id] == student.eos_token_id  # role map: </s> -> <|endoftext|>
    for t_id, s_id in enumerate(loss.id_map):  # every mapped pair has one surface
        if s_id >= 0 and t_id != teacher.eos_token_id:
            assert loss.teacher_table.surface[t_id] == loss.student_table.surface[s_id]
    # a teacher piece absent from the student vocabulary maps nowhere
    s_surfaces = set(loss.student_table.surface)
    unmapped = [t for t, s in enumerate(loss.id_map) if s < 0]
    assert unmapped and all(loss.teacher_table.surface[t] not in s_surfaces for t in unmapped)
    files = list(tmp_path.glob("mined_id_map_*.json"))
    assert len(files) == 1 and loss.cache_path == files[0]
    data = json.loads(files[0].read_text())
    assert data["teacher_vocab"] == len(teacher) and [t_the, s_the] in data["pairs"]
    # second build reads the cache (building would raise)
    monkeypatch.setattr(alignment_mod, "build_id_map", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert MinED(config(name="mined"), case.ctx).id_map == loss.id_map
    # a stale fingerprint is rebuilt
    monkeypatch.undo()
    data["fingerprint"] = "stale"
    data["pairs"] = []
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps(data))
    again = MinED(config(name="mined", mined={"id_map_cache": str(explicit)}), case.ctx)
    assert again.id_map == loss.id_map and json.loads(explicit.read_text())["fingerprint"] != "stale"


# ----------------------------------------------------------------------------- alignment
def _lev_ref(a: bytes, b: bytes) -> int:
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def _all_paths(n: int, m: int) -> list[list[tuple[int, int]]]:
    if (n, m) == (1, 1):
        return [[(0, 0)]]
    out = []
    for di, dj in ((1, 1), (1, 0), (0, 1)):
        if n - di >= 1 and m - dj >= 1 and (n - di, m - dj) != (n, m):
            out += [[*p, (n - 1, m - 1)] for p in _all_paths(n - di, m - dj)]
    return out


def test_levenshtein_and_dtw_are_optimal() -> None:
    rng = random.Random(0)
    alphabet = b"abc "
    for _ in range(60):
        a = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
        b = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
        assert levenshtein(a, b) == _lev_ref(a, b)
    for _ in range(40):
        n, m = rng.randint(1, 4), rng.randint(1, 4)
        xs = [bytes(rng.choice(b"ab") for _ in range(rng.randint(0, 3))) for _ in range(n)]
        ys = [bytes(rng.choice(b"ab") for _ in range(rng.randint(0, 3))) for _ in range(m)]
        best = min(sum(_lev_ref(xs[i], ys[j]) for i, j in p) for p in _all_paths(n, m))
        for window in (0, 1):
            path = dtw_align(xs, ys, window)
            assert path[0] == (0, 0) and path[-1] == (n - 1, m - 1)
            assert all(0 <= i2 - i1 <= 1 and 0 <= j2 - j1 <= 1 for (i1, j1), (i2, j2) in itertools.pairwise(path))
            if window == 0:  # the band is exact only where both sides spell the same text
                assert sum(_lev_ref(xs[i], ys[j]) for i, j in path) == best
    assert dtw_align([], [b"x"]) == []


def test_alignment_of_real_text(toks: tuple[Any, Any]) -> None:
    student, teacher = toks
    s_tab, t_tab = TokenTable.from_tokenizer(student), TokenTable.from_tokenizer(teacher)
    for text in CORPUS:
        a = [s_tab.align[i] for i in student(text)["input_ids"]]
        b = [t_tab.align[i] for i in teacher(text)["input_ids"]]
        full = dtw_align(a, b, 0)
        assert dtw_align(a, b, 4) == full  # the band finds the same optimum
        # identical tokens at identical character offsets are (nearly always) paired by the path
        ss, ts, _, _ = _offsets([len(x) for x in a], [len(x) for x in b])
        twins = {(i, j) for i in range(len(a)) for j in range(len(b)) if a[i] and a[i] == b[j] and ss[i] == ts[j]}
        assert twins and len(twins & set(full)) >= 0.9 * len(twins)
        # what the loss uses: one-to-one pairs whose spans overlap, many identical strings
        used = overlapping([len(x) for x in a], [len(x) for x in b], one_to_one(full))
        assert sum(a[i] == b[j] for i, j in used) >= 0.4 * len(used)
        assert all(
            max(ss[i], ts[j]) < min(ss[i] + len(a[i]), ts[j] + len(b[j])) or (not a[i] and not b[j])
            for i, j in used
        )
        assert b"".join(a) == b"".join(b)  # both cover the same text once markers are stripped


# ----------------------------------------------------------------------------- the loss
def _case(toks: tuple[Any, Any], texts: list[str], **kw: Any) -> Case:
    student, teacher = toks
    s_ids = [student(t)["input_ids"] + [student.eos_token_id] if t else [0] for t in texts]
    t_ids = [teacher(t)["input_ids"] + [teacher.eos_token_id] if t else [1] for t in texts]
    return make_case(
        s_len=[len(x) - 1 for x in s_ids], t_len=[len(x) - 1 for x in t_ids], s_ids=s_ids, t_ids=t_ids,
        v_s=len(student), v_t=len(teacher), d_t=12, student_tokenizer=student, teacher_tokenizer=teacher,
        **kw,
    )


def ref_mined(case: Case, loss: MinED, tau: float) -> torch.Tensor:
    """Per position: mapped max-prob teacher target (renormalised) or one-hot gold; KL to p_S."""
    s, t = case.inputs.student["main"], case.inputs.teacher["main"]
    total = torch.zeros((), dtype=torch.float64)
    for b in range(len(case.s_len)):
        n, m = case.s_len[b], case.t_len[b]
        if n == 0 or m == 0:
            continue
        pairs = dict(loss.align_row(s.targets[b, :n].tolist(), t.targets[b, :m].tolist()))
        for i in range(n):
            lq = torch.log_softmax(case.s_logits[b, i] / tau, 0)
            if i in pairs:
                p = torch.softmax(case.t_hidden[b, pairs[i]] @ case.W_t.T / tau, 0)
                target = [0.0] * case.ctx.vocab_student
                for u, v in enumerate(loss.id_map):
                    if v >= 0:
                        target[v] = max(target[v], float(p[u]))
                z = sum(target)
                for v, mass in enumerate(target):
                    if mass > 0:
                        total = total + mass / z * (torch.log(torch.tensor(mass / z, dtype=torch.float64)) - lq[v])
            else:
                total = total - lq[int(s.targets[b, i])]
    return total / case.inputs.num_tokens


@pytest.mark.parametrize("tau", [0.1, 2.0, 10.0])
def test_matches_reference_values_and_gradients(toks: tuple[Any, Any], tau: float) -> None:
    case = _case(toks, [CORPUS[1], CORPUS[2], "", CORPUS[5], "7"], seed=41)
    case.inputs.teacher["main"].mask[2] = False  # row 2: teacher side empty
    case.t_len[2] = 0
    loss = MinED(config(name="mined", temperature=tau, token_chunk=5), case.ctx)
    total, parts = loss(case.inputs)
    ref = ref_mined(case, loss, tau)
    assert_close(total, ref, rtol=1e-9, what="value")
    assert 0.2 < float(parts["aligned_frac"]) < 1.0
    assert_close(parts["mined_kd"] + parts["mined_onehot"], ref, rtol=1e-9, what="parts")
    (g,) = grads(total, [case.s_logits])
    (g_ref,) = grads(ref, [case.s_logits])
    assert_close(g, g_ref, rtol=1e-7, atol=1e-12, what="grad")
    assert g[2].abs().sum() == 0


def test_chunking_and_edge_cases(toks: tuple[Any, Any]) -> None:
    case = _case(toks, [CORPUS[0], CORPUS[3]], seed=42)
    out = []
    for chunk, ckpt in [(1, True), (3, False), (4096, False)]:
        total, _ = MinED(config(name="mined", token_chunk=chunk, chunk_checkpoint=ckpt), case.ctx)(case.inputs)
        out.append((total, grads(total, [case.s_logits])[0]))
    for total, g in out[1:]:
        assert_close(total, out[0][0], rtol=1e-12, what="value")
        assert_close(g, out[0][1], rtol=1e-10, atol=1e-14, what="grad")
    empty = _case(toks, ["", ""], num_tokens=0.0)
    for view in (empty.inputs.student["main"], empty.inputs.teacher["main"]):
        view.mask[:] = False
    total, parts = MinED(config(name="mined"), empty.ctx)(empty.inputs)
    assert float(total) == 0.0 and all(torch.isfinite(v) for v in parts.values())


def test_requires_tokenizers() -> None:
    case = make_case(s_len=[2])
    with pytest.raises(ValueError, match="tokenizer"):
        MinED(config(name="mined"), case.ctx)


def test_registry_distiller_combines_ce_and_mined(toks: tuple[Any, Any]) -> None:
    case = _case(toks, [CORPUS[4], CORPUS[6]], seed=43)
    loss = build_loss(config(name="mined", kd_rate=0.5, temperature=1.0), case.ctx)
    assert isinstance(loss, Distiller)
    out = loss(case.inputs)
    mask = case.inputs.student["main"].mask
    ce = torch.nn.functional.cross_entropy(
        case.s_logits[mask].float(), case.inputs.student["main"].targets[mask], reduction="sum"
    ) / case.inputs.num_tokens
    assert isinstance(loss.kd, MinED)
    assert_close(out.total, 0.5 * ce + 0.5 * ref_mined(case, loss.kd, 1.0), rtol=1e-5, what="total")
    assert {"kd/mined_kd", "kd/aligned_frac"} <= set(out.parts)
