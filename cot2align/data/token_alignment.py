"""Cross-tokenizer token alignment (data, not loss): what MinED's KD term is computed on.

Pieces, each usable on its own:
* `TokenTable`: per-vocabulary surface bytes of every token id (byte-level BPE, SentencePiece
  "▁" + byte fallback, WordPiece "##"), computed once.
* `build_id_map`: teacher id -> student id by exact match of surface bytes (cached as JSON).
* `dtw_align`: dynamic-programming alignment of two token-string sequences with
  Levenshtein local costs, banded around the character-offset diagonal.
* `TokenAligner`: both tables, the id map and `align_row`, which keeps the pairs whose teacher
  token maps to the student's own token (DSKD's identity gate).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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


# ----------------------------------------------------------------------------- DP alignment
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


def role_ids(tokenizer: object) -> dict[str, int]:
    """{"eos": id, "bos": id, "unk": id} for the roles the tokenizer defines."""
    out: dict[str, int] = {}
    for role in ("eos", "bos", "unk"):
        value = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(value, int):
            out[role] = value
    return out


class TokenAligner:
    """Position alignment between a student's and a teacher's tokenization of the same text.

    Built once from both tokenizers: the token tables, the teacher -> student id map (cached to
    `cache_path`, or to <cache_dir>/mined_id_map_<hash>.json, see `load_or_build_id_map`) and
    the alignment settings (`window`: DTW band in characters, 0 = full DP; `require_overlap`).
    """

    def __init__(
        self,
        student_tokenizer: object,
        teacher_tokenizer: object,
        vocab_student: int | None = None,
        vocab_teacher: int | None = None,
        cache_path: Path | None = None,
        window: int = 32,
        require_overlap: bool = True,
        cache_dir: Path | None = None,
    ) -> None:
        self.student_table = TokenTable.from_tokenizer(student_tokenizer, vocab_student or None)
        self.teacher_table = TokenTable.from_tokenizer(teacher_tokenizer, vocab_teacher or None)
        if cache_path is None and cache_dir is not None:
            cache_path = Path(cache_dir) / f"mined_id_map_{self.fingerprint()[:16]}.json"
        self.cache_path = cache_path
        self.window = window
        self.require_overlap = require_overlap
        self.id_map: list[int] = load_or_build_id_map(
            self.teacher_table, self.student_table, cache_path,
            role_ids(teacher_tokenizer), role_ids(student_tokenizer),
        )

    def fingerprint(self) -> str:
        """sha256 of both vocabularies (see `vocab_fingerprint`)."""
        return vocab_fingerprint(self.teacher_table, self.student_table)

    def mapped_pairs(self) -> list[tuple[int, int]]:
        """(teacher id, student id) for every teacher id the id map covers."""
        return [(t, s) for t, s in enumerate(self.id_map) if s >= 0]

    def align_row(self, s_targets: list[int], t_targets: list[int]) -> list[tuple[int, int]]:
        """(student position i, teacher position j) pairs where the teacher's distribution at j may
        stand for the student's at i.

        s_targets (n) / t_targets (m): the token ids each response position predicts. The pair
        must (1) be one-to-one on the `dtw_align` path of the marker-free token strings, (2) when
        `require_overlap`, cover overlapping characters (our refinement: edit-distance DTW pairs
        different pieces of text around tokens of very different lengths), and (3) pass DSKD's
        identity gate: the teacher token maps to a student id (the id map) EQUAL to the
        student's token s_targets[i] (so cat / cats, ab / abc, 12 / 1 are never aligned).
        """
        st, tt = self.student_table, self.teacher_table
        sa = [st.align[t] if 0 <= t < len(st.align) else b"" for t in s_targets]
        ta = [tt.align[t] if 0 <= t < len(tt.align) else b"" for t in t_targets]
        s_spans = [st.span(t) for t in s_targets]
        t_spans = [tt.span(t) for t in t_targets]
        pairs = one_to_one(dtw_align(sa, ta, self.window, s_spans, t_spans))
        if self.require_overlap:
            pairs = overlapping(s_spans, t_spans, pairs)
        n_map = len(self.id_map)
        return [(i, j) for i, j in pairs
                if 0 <= t_targets[j] < n_map and self.id_map[t_targets[j]] >= 0
                and self.id_map[t_targets[j]] == s_targets[i]]
