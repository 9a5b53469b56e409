"""MinED (`mined`): edit-distance token alignment across tokenizers, then KD in the student vocabulary.

Pieces, each usable on its own:
* `TokenTable`: per-vocabulary surface bytes of every token id (byte-level BPE, SentencePiece
  "▁" + byte fallback, WordPiece "##"), computed once.
* `build_id_map`: teacher id -> student id by exact match of surface bytes (cached as JSON).
* `dtw_align`: dynamic-programming alignment of two token-string sequences with
  Levenshtein local costs, banded around the character-offset diagonal.
* `MinED`: the loss.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from cot2align.losses.base import KDTerm, LossContext, LossInputs
from cot2align.losses.config import LossConfig
from cot2align.losses.kd import chunked_sum, final_hidden, main_views, token_denominator, up

ID_MAP_VERSION = 1
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable char -> byte (GPT-2 style scheme).

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 bytes are
    mapped, in byte order, to the code points 256, 257, ...
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table: dict[str, int] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_alphabet()


def _component_types(state: object) -> set[str]:
    """All "type" names in a serialized tokenizers component (nested Sequences included)."""
    found: set[str] = set()
    if isinstance(state, dict):
        if isinstance(state.get("type"), str):
            found.add(state["type"])
        for value in state.values():
            found |= _component_types(value)
    elif isinstance(state, list):
        for value in state:
            found |= _component_types(value)
    return found


def _backend(tokenizer: object) -> object:
    """The `tokenizers.Tokenizer` behind an HF fast tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    if not hasattr(backend, "get_vocab") or not hasattr(backend, "model"):
        raise TypeError(
            f"mined: need a Hugging Face fast tokenizer (or tokenizers.Tokenizer), got {type(tokenizer).__name__}"
        )
    return backend


@dataclass
class TokenTable:
    """Surface form of every id of one vocabulary.

    surface[i]: the bytes token i stands for in decoded text, with a word-initial space
    written as b" " ("Ġ", "▁" and WordPiece word starts all become b" "); byte-fallback
    tokens "<0xHH>" become that byte; None for ids without a token.
    special[i]: True for special added tokens (their surface is their content string).
    align[i]: the string used for alignment = surface with the space markers removed.
    """

    surface: list[bytes | None]
    special: list[bool]
    align: list[bytes]

    @classmethod
    def from_tokenizer(cls, tokenizer: object, size: int | None = None) -> TokenTable:
        """Build from an HF fast tokenizer; `size` pads/truncates to the model's vocabulary size."""
        backend = _backend(tokenizer)
        vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)  # type: ignore[attr-defined]
        added = backend.get_added_tokens_decoder()  # type: ignore[attr-defined]
        model = backend.model  # type: ignore[attr-defined]
        model_type = type(model).__name__
        types: set[str] = set()
        for part in ("decoder", "pre_tokenizer"):
            comp = getattr(backend, part, None)
            if comp is not None:
                types |= _component_types(json.loads(comp.__getstate__()))
        byte_level = "ByteLevel" in types
        prefix = getattr(model, "continuing_subword_prefix", None) or ("##" if model_type == "WordPiece" else None)
        suffix = getattr(model, "end_of_word_suffix", None)
        n = max(vocab.values(), default=-1) + 1 if size is None else size
        surface: list[bytes | None] = [None] * n
        special = [False] * n
        for text, idx in vocab.items():
            if idx >= n:
                continue
            tok = added.get(idx)
            if tok is not None:
                special[idx] = bool(tok.special)
                surface[idx] = tok.content.encode("utf-8")
                continue
            surface[idx] = _surface(text, byte_level, model_type == "WordPiece", prefix, suffix)
        align = [b"" if s is None else (s if sp else s.replace(b" ", b"")) for s, sp in zip(surface, special)]
        return cls(surface, special, align)

    def span(self, idx: int) -> int:
        """Characters token `idx` covers in the text for offsets: 0 for special tokens and unknown ids."""
        if 0 <= idx < len(self.align) and not self.special[idx]:
            return len(self.align[idx])
        return 0

    def keys(self) -> list[tuple[bool, bytes] | None]:
        """Id-map keys per id: (is_special, surface bytes), None where there is no token."""
        return [None if s is None else (sp, s) for s, sp in zip(self.surface, self.special)]


def _surface(text: str, byte_level: bool, wordpiece: bool, prefix: str | None, suffix: str | None) -> bytes:
    """Surface bytes of one (non-added) vocabulary entry; see TokenTable."""
    if byte_level and all(ch in _BYTE_LEVEL for ch in text):
        return bytes(_BYTE_LEVEL[ch] for ch in text)
    m = _BYTE_FALLBACK.match(text)
    if m is not None:
        return bytes([int(m.group(1), 16)])
    if wordpiece:
        if prefix and text.startswith(prefix) and len(text) > len(prefix):
            text = text[len(prefix) :]
        else:
            text = " " + text
    elif prefix and text.startswith(prefix) and len(text) > len(prefix):
        text = text[len(prefix) :]
    if suffix and text.endswith(suffix) and len(text) > len(suffix):
        text = text[: -len(suffix)] + " "
    return text.replace("▁", " ").encode("utf-8")


# ----------------------------------------------------------------------------- id map
def vocab_fingerprint(teacher: TokenTable, student: TokenTable) -> str:
    """sha256 over both vocabularies' id-map keys (and the map's format version)."""
    h = hashlib.sha256(f"mined-id-map-v{ID_MAP_VERSION}".encode())
    for table in (teacher, student):
        h.update(f"|{len(table.surface)}|".encode())
        for key in table.keys():
            h.update(b"\x00N" if key is None else (b"\x00S" if key[0] else b"\x00T") + key[1])
    return h.hexdigest()


def build_id_map(
    teacher: TokenTable,
    student: TokenTable,
    teacher_specials: dict[str, int] | None = None,
    student_specials: dict[str, int] | None = None,
) -> list[int]:
    """Teacher id -> student id (-1 = none): exact equality of (is_special, surface bytes).

    When several student ids share a surface, the smallest id wins. Several teacher ids may map
    to one student id (e.g. "▁" and "<0x20>"). Role specials (eos, bos, unk: the dicts map a
    role to an id) are mapped role to role in addition.
    """
    by_key: dict[tuple[bool, bytes], int] = {}
    for sid, key in enumerate(student.keys()):
        if key is not None and key not in by_key:
            by_key[key] = sid
    out = [-1] * len(teacher.surface)
    for tid, key in enumerate(teacher.keys()):
        if key is not None:
            out[tid] = by_key.get(key, -1)
    for role, tid in (teacher_specials or {}).items():
        role_sid = (student_specials or {}).get(role)
        if role_sid is not None and 0 <= tid < len(out) and 0 <= role_sid < len(student.surface):
            out[tid] = role_sid
    return out


def load_or_build_id_map(
    teacher: TokenTable,
    student: TokenTable,
    path: Path | None,
    teacher_specials: dict[str, int] | None = None,
    student_specials: dict[str, int] | None = None,
) -> list[int]:
    """The id map, read from `path` when its recorded fingerprint matches, else built and written.

    The JSON file holds {"version", "fingerprint", "teacher_vocab", "student_vocab", "pairs":
    [[teacher_id, student_id], ...]}; written atomically (several ranks may race).
    """
    fingerprint = vocab_fingerprint(teacher, student) + repr(sorted((teacher_specials or {}).items()))
    fingerprint += repr(sorted((student_specials or {}).items()))
    if path is not None and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("version") == ID_MAP_VERSION and data.get("fingerprint") == fingerprint:
                out = [-1] * len(teacher.surface)
                for tid, sid in data["pairs"]:
                    out[tid] = sid
                return out
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            pass  # unreadable or stale cache: rebuild below
    out = build_id_map(teacher, student, teacher_specials, student_specials)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": ID_MAP_VERSION,
            "fingerprint": fingerprint,
            "teacher_vocab": len(teacher.surface),
            "student_vocab": len(student.surface),
            "pairs": [[t, s] for t, s in enumerate(out) if s >= 0],
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh)
        os.replace(tmp, path)
    return out


# ----------------------------------------------------------------------------- alignment
@lru_cache(maxsize=1 << 20)
def levenshtein(a: bytes, b: bytes) -> int:
    """Edit distance (unit insert / delete / substitute) between two byte strings."""
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _offsets(a: list[int], b: list[int]) -> tuple[list[int], list[float], list[float], int]:
    """Character offsets from token span lengths a (n), b (m).

    Returns (start of each a token, start and end of each b token scaled by r = sum(a) /
    sum(b) to a's text length, sum(a)).
    """
    s_start, pos = [], 0
    for length in a:
        s_start.append(pos)
        pos += length
    total_a = pos
    t_start, t_end, pos = [], [], 0
    for length in b:
        t_start.append(pos)
        pos += length
        t_end.append(pos)
    r = total_a / pos if pos > 0 else 1.0
    return s_start, [x * r for x in t_start], [x * r for x in t_end], total_a


def _spans(tokens: list[bytes], spans: list[int] | None) -> list[int]:
    """Span lengths for offsets: `spans` when given, else the strings' lengths."""
    return [len(t) for t in tokens] if spans is None else spans


def _band(a: list[int], b: list[int], window: int) -> list[tuple[int, int]]:
    """Per row i of `a`, the inclusive column range [lo_i, hi_i] of `b` inside the band.

    a / b are span lengths. Token i of `a` covers characters [s_i, s_i + a_i) of its text;
    token j of `b` covers [r t_j, r (t_j + b_j)] with r = sum(a) / sum(b). (i, j) is in the
    band when the two closed intervals meet once i's is widened by `window` on both sides.
    """
    s_start, t_start_r, t_end_r, _ = _offsets(a, b)
    out = []
    m = len(b)
    for i, length in enumerate(a):
        lo = bisect.bisect_left(t_end_r, s_start[i] - window)
        hi = bisect.bisect_right(t_start_r, s_start[i] + length + window) - 1
        out.append((min(lo, m - 1), max(hi, 0)))
    out[0] = (0, out[0][1])
    out[-1] = (out[-1][0], m - 1)
    return out


def dtw_align(
    a: list[bytes],
    b: list[bytes],
    window: int = 0,
    a_spans: list[int] | None = None,
    b_spans: list[int] | None = None,
) -> list[tuple[int, int]]:
    """DTW alignment path between token strings `a` (n) and `b` (m), local cost Levenshtein.

    D(i, j) = c(i, j) + min(D(i-1, j-1), D(i-1, j), D(i, j-1)), D(-1, -1) = 0, with
    c(i, j) = lev(a_i, b_j) + |s_i - r t_j| / ((L + 1) (n + m)), where s_i / r t_j are the
    character offsets of the tokens in their (marker-free) texts, r = L / len(b-text) and
    L = len(a-text). The second term sums to < 1 over any path, so it never changes which
    paths have the least total edit distance (an integer); it only breaks ties between them in
    favour of the path that keeps character offsets together (plain edit-distance DTW lets a
    token absorb its neighbours' digits on ties). The path is traced back from (n-1, m-1) to
    (0, 0), preferring on exact ties the diagonal, then (i-1, j), then (i, j-1).
    Returns [(i, j), ...] in increasing order; [] if either is empty. window > 0 restricts
    the DP to a band around the character-offset diagonal (see _band); the full DP is used
    when the band holds no complete path. a_spans / b_spans: lengths used for the character
    offsets (default: the strings' lengths; MinED gives special tokens span 0).
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    inf = float("inf")
    a_len, b_len = _spans(a, a_spans), _spans(b, b_spans)
    s_start, t_start_r, _, total_a = _offsets(a_len, b_len)
    tie = 1.0 / ((total_a + 1) * (n + m))
    ranges = _band(a_len, b_len, window) if window > 0 else [(0, m - 1)] * n
    rows: list[list[float]] = []
    for i in range(n):
        lo, hi = ranges[i]
        row: list[float] = []
        prev = rows[i - 1] if i > 0 else None
        plo, phi = ranges[i - 1] if i > 0 else (0, -1)
        ai, si = a[i], s_start[i]
        for j in range(lo, hi + 1):
            if i == 0 and j == 0:
                best = 0.0
            else:
                best = inf
                if prev is not None:
                    if plo <= j - 1 <= phi:
                        best = prev[j - 1 - plo]
                    if plo <= j <= phi and prev[j - plo] < best:
                        best = prev[j - plo]
                if j > lo and row[-1] < best:
                    best = row[-1]
            row.append(best + levenshtein(ai, b[j]) + abs(si - t_start_r[j]) * tie)
        rows.append(row)
    if ranges[-1][1] != m - 1 or rows[-1][-1] == inf:
        if window > 0:
            return dtw_align(a, b, 0, a_spans, b_spans)
        raise RuntimeError("dtw_align: no alignment path (internal error)")

    def cell(i: int, j: int) -> float:
        lo, hi = ranges[i]
        return rows[i][j - lo] if lo <= j <= hi else inf

    path = [(n - 1, m - 1)]
    i, j = n - 1, m - 1
    while (i, j) != (0, 0):
        options = []
        if i > 0 and j > 0:
            options.append((cell(i - 1, j - 1), 0, i - 1, j - 1))
        if i > 0:
            options.append((cell(i - 1, j), 1, i - 1, j))
        if j > 0:
            options.append((cell(i, j - 1), 2, i, j - 1))
        _, _, i, j = min(options)
        path.append((i, j))
    path.reverse()
    return path


def one_to_one(path: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pairs (i, j) of a path where i meets no other j and j meets no other i."""
    count_i: dict[int, int] = {}
    count_j: dict[int, int] = {}
    for i, j in path:
        count_i[i] = count_i.get(i, 0) + 1
        count_j[j] = count_j.get(j, 0) + 1
    return [(i, j) for i, j in path if count_i[i] == 1 and count_j[j] == 1]


def overlapping(a: list[int], b: list[int], pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pairs whose character spans overlap; a / b are span lengths (offsets as in _band).

    A pair of two zero-length spans (special tokens, e.g. end of sequence on both sides)
    counts as overlapping when they sit at the same offset; a zero-length span never
    overlaps a non-empty one.
    """
    s_start, t_start_r, t_end_r, _ = _offsets(a, b)
    out = []
    for i, j in pairs:
        if a[i] == 0 and b[j] == 0:
            if abs(s_start[i] - t_start_r[j]) < 0.5:
                out.append((i, j))
        elif max(s_start[i], t_start_r[j]) < min(s_start[i] + a[i], t_end_r[j]):
            out.append((i, j))
    return out


def _role_ids(tokenizer: object) -> dict[str, int]:
    """{"eos": id, "bos": id, "unk": id} for the roles the tokenizer defines."""
    out: dict[str, int] = {}
    for role in ("eos", "bos", "unk"):
        value = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(value, int):
            out[role] = value
    return out


class _TargetKLSum(torch.autograd.Function):
    """sum over chunks of rows idx of flat_s of KL(q || softmax(flat_s[idx] / tau)), q from a callback.

    Forward, per chunk: log q [c, V] = target(a, b) (no grad; entries -inf where q = 0) and the
    KL value; q is kept for backward (the teacher side's one [tokens, V] tensor), so the
    callback (the frozen teacher head) runs once. Backward recomputes softmax(z / tau) per
    chunk: d KL / dz = (sum(q) softmax(z / tau) - q) / tau.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, flat_s: Tensor, idx: Tensor, target: Callable[[int, int], Tensor], tau: float, chunk: int
    ) -> Tensor:
        total = torch.zeros((), dtype=up(flat_s[:0]).dtype, device=flat_s.device)
        kept: list[Tensor] = []
        for a in range(0, idx.numel(), chunk):
            b = min(a + chunk, idx.numel())
            ls = F.log_softmax(up(flat_s[idx[a:b]]) / tau, dim=-1)  # [c, V]
            lq = target(a, b).to(ls.dtype)  # [c, V]
            q = lq.exp()
            total = total + torch.where(q > 0, q * (lq.clamp(min=-1e30) - ls), 0.0).sum()
            kept.append(q)
        ctx.save_for_backward(flat_s, idx, *kept)
        ctx.tau, ctx.chunk = tau, chunk
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        flat_s, idx, *kept = ctx.saved_tensors
        grad = torch.zeros_like(flat_s)  # [B*N_s, V]: the gradient autograd needs anyway
        for k, q in enumerate(kept):
            ii = idx[k * ctx.chunk : k * ctx.chunk + q.shape[0]]
            p = F.softmax(up(flat_s[ii]) / ctx.tau, dim=-1)  # [c, V]
            dz = (q.sum(-1, keepdim=True) * p - q) * (grad_out / ctx.tau)
            grad.index_copy_(0, ii, dz.to(grad.dtype))
        return grad, None, None, None, None


# ----------------------------------------------------------------------------- the loss
class MinED(KDTerm):
    """MinED KD (Wan et al. 2024, as used by DSKD) for models with different tokenizers.

    For every row with a non-empty response on both sides:
    1. the student target tokens y_0..y_{n-1} and the teacher target tokens y'_0..y'_{m-1}
       (their `targets`, the tokens each position predicts) are turned into alignment strings
       (surface bytes without the "Ġ" / "▁" / word-start space markers) and aligned by
       `dtw_align` (Levenshtein local cost, band cfg.mined.dtw_window characters);
    2. student position i is ALIGNED to teacher position j when the path pairs them one to
       one, the teacher token y'_j has a student id in the id map, and (cfg.mined.
       require_overlap, default on: our refinement) the two tokens' character spans in the
       marker-free texts overlap, so a DTW pairing of two different pieces of text (which
       edit-distance DTW produces around tokens of very different lengths) never passes the
       teacher's distribution to the wrong position;
    3. target distribution at an aligned i: with p = softmax(z_T[j] / tau) over the teacher
       vocabulary and M the id map, q_v = max_{u : M(u) = v} p_u for v in the image of M,
       0 elsewhere, renormalised to sum 1 (computed in log space: never NaN);
       at any other position: q = one-hot(y_i);
    4. loss at i: KL(q || softmax(z_S[i] / tau)) (= CE at temperature tau for one-hot q).

        MinED = sum_rows sum_i loss_i / num_tokens   (rows empty on either side contribute 0)

    No tau^2 factor. Parts: "mined" (total), "mined_kd" (aligned positions), "mined_onehot"
    (the rest), "aligned_frac" (fraction of local student positions that are aligned).

    The id map (teacher vocab -> student vocab) is built once from the tokenizers in `ctx`
    and cached to cfg.mined.id_map_cache or <ctx.cache_dir>/mined_id_map_<hash>.json.

    Memory and cost: aligned positions are processed in chunks of cfg.token_chunk with one
    [chunk, V_S] student log-prob tensor and one [chunk, V_T] teacher log-prob tensor at a
    time; the mapped targets q are KEPT for backward: one [aligned, V_S] tensor (the teacher
    side's one [tokens, vocab] tensor, in the student vocabulary), so the frozen teacher head
    runs once per step instead of again in backward; backward recomputes only the student
    softmax per chunk. One-hot positions need only a log-sum-exp per row (recomputed under
    cfg.chunk_checkpoint). Besides q, no full [tokens, V] tensor except inputs.student_logits
    (owned by the trainer) and, in backward, its gradient.
    """

    def __init__(self, cfg: LossConfig, ctx: LossContext) -> None:
        super().__init__(cfg, ctx)
        if ctx.student_tokenizer is None or ctx.teacher_tokenizer is None:
            raise ValueError("mined: LossContext.student_tokenizer and .teacher_tokenizer are both required")
        self.student_table = TokenTable.from_tokenizer(ctx.student_tokenizer, ctx.vocab_student or None)
        self.teacher_table = TokenTable.from_tokenizer(ctx.teacher_tokenizer, ctx.vocab_teacher or None)
        path: Path | None = None
        if cfg.mined.id_map_cache:
            path = Path(cfg.mined.id_map_cache)
        elif ctx.cache_dir:
            fp = vocab_fingerprint(self.teacher_table, self.student_table)[:16]
            path = Path(ctx.cache_dir) / f"mined_id_map_{fp}.json"
        self.cache_path = path
        id_map = load_or_build_id_map(
            self.teacher_table,
            self.student_table,
            path,
            _role_ids(ctx.teacher_tokenizer),
            _role_ids(ctx.student_tokenizer),
        )
        self.id_map: list[int] = id_map
        self.map_teacher: Tensor
        self.map_student: Tensor
        mapped = [(t, s) for t, s in enumerate(id_map) if s >= 0]
        self.register_buffer(
            "map_teacher", torch.tensor([t for t, _ in mapped], dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "map_student", torch.tensor([s for _, s in mapped], dtype=torch.long), persistent=False
        )

    def align_row(self, s_targets: list[int], t_targets: list[int]) -> list[tuple[int, int]]:
        """Aligned (student position, teacher position) pairs of one row (steps 1-2 of the class doc)."""
        sa = [self.student_table.align[t] if 0 <= t < len(self.student_table.align) else b"" for t in s_targets]
        ta = [self.teacher_table.align[t] if 0 <= t < len(self.teacher_table.align) else b"" for t in t_targets]
        s_spans = [self.student_table.span(t) for t in s_targets]
        t_spans = [self.teacher_table.span(t) for t in t_targets]
        pairs = one_to_one(dtw_align(sa, ta, self.cfg.mined.dtw_window, s_spans, t_spans))
        if self.cfg.mined.require_overlap:
            pairs = overlapping(s_spans, t_spans, pairs)
        return [(i, j) for i, j in pairs if 0 <= t_targets[j] < len(self.id_map) and self.id_map[t_targets[j]] >= 0]

    def mapped_log_target(self, teacher_logits: Tensor, student_vocab: int) -> Tensor:
        """log q [c, V_S] from teacher logits [c, V_T] (step 3); -inf outside the map's image.

        max_u log p_u = max_u z_u / tau - logsumexp(z / tau): the teacher's normaliser is one
        constant per row and cancels in the renormalisation over the student vocabulary, so only
        the M mapped teacher columns are read ([c, M], no [c, V_T] log-softmax).
        """
        z = teacher_logits
        keep = (self.map_teacher < z.shape[-1]) & (self.map_student < student_vocab)
        src = up(z[:, self.map_teacher[keep]]) / self.cfg.temperature  # [c, M]
        dst = self.map_student[keep][None, :].expand_as(src)
        m = torch.full((z.shape[0], student_vocab), float("-inf"), device=z.device, dtype=src.dtype)
        m = m.scatter_reduce(1, dst, src, reduce="amax", include_self=True)
        return F.log_softmax(m, dim=-1)

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """MinED scalar and its parts; see the class docstring."""
        s_view, t_view = main_views(inputs, "mined")
        logits = inputs.student_logits
        bsz, n_s, v_s = logits.shape
        n_t = t_view.mask.shape[1]
        h_t = final_hidden(t_view, inputs.teacher_final, "mined teacher")
        flat_s = logits.reshape(-1, v_s)  # [B*N_s, V_S]
        flat_t = h_t.reshape(-1, h_t.shape[-1])  # [B*N_t, d_T]
        s_len = s_view.lengths.tolist()
        t_len = t_view.lengths.tolist()
        s_tg = s_view.targets.tolist()
        t_tg = t_view.targets.tolist()
        kd_s: list[int] = []
        kd_t: list[int] = []
        hot = torch.zeros(bsz, n_s, dtype=torch.bool, device=logits.device)
        for b in range(bsz):
            if s_len[b] == 0 or t_len[b] == 0:
                continue
            pairs = self.align_row(s_tg[b][: s_len[b]], t_tg[b][: t_len[b]])
            hot[b, : s_len[b]] = True
            for i, j in pairs:
                kd_s.append(b * n_s + i)
                kd_t.append(b * n_t + j)
                hot[b, i] = False
        dev = logits.device
        s_idx = torch.tensor(kd_s, dtype=torch.long, device=dev)
        t_idx = torch.tensor(kd_t, dtype=torch.long, device=dev)
        tau = self.cfg.temperature

        def target(a: int, b: int) -> Tensor:
            with torch.no_grad():
                return self.mapped_log_target(inputs.teacher_head(flat_t[t_idx[a:b]]), v_s)  # [c, V_S]

        kd_sum = _TargetKLSum.apply(flat_s, s_idx, target, tau, self.cfg.token_chunk)
        hot_idx = hot.reshape(-1).nonzero().squeeze(1)
        y = s_view.targets.reshape(-1)

        def hot_chunk(a: int, b: int) -> Tensor:
            ii = hot_idx[a:b]
            return F.cross_entropy(up(flat_s[ii]) / tau, y[ii], reduction="sum").reshape(1)

        hot_sum = chunked_sum(hot_chunk, hot_idx.numel(), self.cfg.token_chunk, 1, dev, self.cfg.chunk_checkpoint)[0]
        denom = token_denominator(inputs.num_tokens)
        total = (kd_sum + hot_sum) / denom
        local = len(kd_s) + hot_idx.numel()
        frac = torch.tensor(len(kd_s) / local if local else 0.0, device=dev)
        return total, {
            "mined": total.detach(),
            "mined_kd": (kd_sum / denom).detach(),
            "mined_onehot": (hot_sum / denom).detach(),
            "aligned_frac": frac,
        }
