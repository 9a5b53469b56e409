"""Point-to-point messages between teacher and student ranks: headers, packed states, deadlines.

What travels, teacher -> student, per (step, micro-batch, format) and sending rank::

    header  int64 [HEADER_SIZE]   kind, step, micro-batch, format, layers, rows, width, checksums
    payload [n_layers, rows, d]   hidden states of RESPONSE positions only, rows = sum of lengths

The student knows the response lengths (it tokenizes the teacher side itself), so it
allocates the payload buffer before anything arrives and checks the header against
what it expects: a desync (other step, other samples, other lengths) is a clear error
instead of garbage. Student -> teacher there is one `Request` per run (which layers
and formats to serve, from which step). A teacher that fails sends an ERROR header
with its message; the last message of a run is END. After END the student answers
each rank of its replica with one control header: DONE, or STOP when it stops early at a
step boundary (preemption); a stopping student first sends STOP, then drains what is in
flight until END, so no send is left unmatched. A request may end before the student's run does
(teacher.cache.mode=auto asks for the first epoch only): its DONE is the last word the replica
waits for, and nothing travels between them afterwards.

Every receive has a deadline; a timeout or a closed connection raises `PeerError`
naming the peer's rank and role ("teacher rank 1 (replica 0, pp 0, tp 1) sent nothing
for 30 s"). Sends are asynchronous with a bounded number in flight (the teacher's
prefetch). The transport knows only tensors: no models, no losses.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cot2align.distributed.failures import BLAME_WAIT_S, DesyncError, PeerDied, PeerError, silent_peers

MAGIC = 0xC07A11
HEADER_SIZE = 32
MAX_LAYERS = HEADER_SIZE - 12
FORMATS = ("main", "aux")
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# message kinds
REQUEST, DATA, END, ERROR, STOP, DONE = 1, 2, 3, 4, 5, 6
KIND_NAMES = {REQUEST: "request", DATA: "data", END: "end", ERROR: "error", STOP: "stop", DONE: "done"}
DIED_PREFIX = "died:"
"""An ERROR message that starts with `died:<rank>,<rank>:` blames those ranks, not its sender."""


def checksum(values: Sequence[int] | Tensor) -> int:
    """Order-sensitive checksum of a list of small non-negative ints (fits in int64)."""
    vals = values.tolist() if isinstance(values, Tensor) else list(values)
    acc = len(vals)
    for i, v in enumerate(vals):
        acc = (acc * 1_000_003 + (i + 1) * (int(v) + 1)) % (1 << 61)
    return acc


@dataclass(frozen=True)
class DataHeader:
    """Header of one DATA / END / ERROR message (see the module docstring)."""

    kind: int
    step: int = -1
    micro: int = -1
    fmt: int = -1
    """Index into FORMATS."""
    layers: tuple[int, ...] = ()
    """Served layers in the payload, in payload order."""
    rows: int = 0
    """Response positions packed (DATA) or bytes of the message (ERROR)."""
    width: int = 0
    """Hidden size d."""
    lengths_sum: int = 0
    """checksum() of the per-row response lengths."""
    indices_sum: int = 0
    """checksum() of the micro-batch's sample indices."""
    busy_ms: int = 0
    """DATA: the sending teacher rank's forward time so far (ms; statistics, not checked)."""
    wait_ms: int = 0
    """DATA: the sending teacher rank's time blocked on full send queues so far (ms)."""

    def checked(self) -> DataHeader:
        """The fields a receiver checks (statistics zeroed)."""
        return replace(self, busy_ms=0, wait_ms=0)

    def to_tensor(self, device: torch.device) -> Tensor:
        """int64 [HEADER_SIZE]."""
        if len(self.layers) > MAX_LAYERS:
            raise ValueError(f"at most {MAX_LAYERS} layers per message, got {len(self.layers)}")
        vals = [MAGIC, self.kind, self.step, self.micro, self.fmt, self.rows, self.width, self.lengths_sum,
                self.indices_sum, len(self.layers), self.busy_ms, self.wait_ms, *self.layers]
        out = torch.zeros(HEADER_SIZE, dtype=torch.int64)
        out[: len(vals)] = torch.tensor(vals, dtype=torch.int64)
        return out.to(device)

    @classmethod
    def from_tensor(cls, t: Tensor) -> DataHeader:
        v = t.tolist()
        if v[0] != MAGIC:
            raise DesyncError(f"not a message header (magic {v[0]:#x}, expected {MAGIC:#x})")
        n = v[9]
        return cls(kind=v[1], step=v[2], micro=v[3], fmt=v[4], rows=v[5], width=v[6], lengths_sum=v[7],
                   indices_sum=v[8], layers=tuple(v[12 : 12 + n]), busy_ms=v[10], wait_ms=v[11])

    def describe(self) -> str:
        what = KIND_NAMES.get(self.kind, f"kind {self.kind}")
        if self.kind != DATA:
            return what
        fmt = FORMATS[self.fmt] if 0 <= self.fmt < len(FORMATS) else self.fmt
        return (f"data of step {self.step}, micro-batch {self.micro}, format {fmt}, layers {list(self.layers)}, "
                f"{self.rows} rows x {self.width}")


@dataclass(frozen=True)
class Request:
    """What a student asks its teacher replica to serve (sent once per run to every rank of it)."""

    first_step: int
    total_steps: int
    layers: tuple[int, ...]
    """Resolved teacher layers (0 = embedding output, L = final-norm output); empty = nothing."""
    fmts: tuple[str, ...]
    num_samples: int
    micro_batch: int
    accum: int
    dp: int
    seed: int

    def to_tensor(self, device: torch.device) -> Tensor:
        if len(self.layers) > MAX_LAYERS:
            raise ValueError(f"at most {MAX_LAYERS} served layers, got {len(self.layers)}")
        mask = sum(1 << FORMATS.index(f) for f in self.fmts)
        vals = [MAGIC, REQUEST, self.first_step, self.total_steps, mask, self.num_samples, self.micro_batch,
                self.accum, self.dp, self.seed, len(self.layers), 0, *self.layers]
        out = torch.zeros(HEADER_SIZE, dtype=torch.int64)
        out[: len(vals)] = torch.tensor(vals, dtype=torch.int64)
        return out.to(device)

    @classmethod
    def from_tensor(cls, t: Tensor) -> Request:
        v = t.tolist()
        if v[0] != MAGIC or v[1] != REQUEST:
            raise DesyncError(f"expected a request header, got magic {v[0]:#x}, kind {v[1]}")
        fmts = tuple(f for i, f in enumerate(FORMATS) if v[4] >> i & 1)
        return cls(first_step=v[2], total_steps=v[3], fmts=fmts, num_samples=v[5], micro_batch=v[6], accum=v[7],
                   dp=v[8], seed=v[9], layers=tuple(v[12 : 12 + v[10]]))


def any_rank(flag: bool, group: Any, device: torch.device) -> bool:
    """Whether `flag` is set on any rank of `group` (an all-reduce of one int on `device`: CPU for
    gloo, the rank's GPU for nccl)."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def pack(hidden: dict[int, Tensor], mask: Tensor, layers: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Response states of `layers` packed for the wire.

    hidden[layer]: [B, N, d] (response positions, left-aligned); mask: [B, N] bool.
    Returns [len(layers), S, d] contiguous in `dtype`, S = mask.sum() (row-major order).
    """
    mask = mask.to(next(iter(hidden.values())).device)
    return torch.stack([hidden[layer][mask] for layer in layers]).to(dtype).contiguous()


def unpack(packed: Tensor, mask: Tensor, layers: Sequence[int], dtype: torch.dtype) -> dict[int, Tensor]:
    """Inverse of `pack`: [n_layers, S, d] -> {layer: [B, N, d]} (zeros off the mask)."""
    b, n = mask.shape
    out = {}
    for i, layer in enumerate(layers):
        h = packed.new_zeros((b, n, packed.shape[-1]), dtype=dtype)
        h[mask.to(packed.device)] = packed[i].to(dtype)
        out[layer] = h
    return out


@dataclass
class _Pending:
    dst: int
    works: list[Any]
    tensors: list[Tensor]
    what: str


@dataclass
class Transport:
    """Asynchronous sends and deadline-bounded receives over the default process group.

    describe(rank) -> "teacher rank 1 (replica 0, pp 0, tp 1)" names peers in errors.
    max_in_flight: messages sent but not yet received before `send` blocks (prefetch).
    send_timeout_s: how long a peer may take to accept a sent message (it may be busy,
    e.g. evaluating), after which the send fails naming the peer.
    """

    describe: Callable[[int], str]
    device: torch.device
    peers_of: Callable[[int], Sequence[int]] = lambda rank: [rank]
    """The ranks that compute together with `rank` (its teacher replica); a closed connection to
    `rank` may come from any of them."""
    blame_wait_s: float = BLAME_WAIT_S
    """How long a rank that lost a connection waits for the others to check in (see `silent_peers`)."""
    max_in_flight: int = 2
    send_timeout_s: float = 1800.0
    bytes_sent: int = 0
    messages_sent: int = 0
    send_wait_s: float = 0.0
    """Time `send` spent blocked because max_in_flight messages were pending."""
    _pending: deque[_Pending] = field(default_factory=deque)

    # ------------------------------------------------------------------ sending
    def send(self, dst: int, header: DataHeader | Request, payload: Tensor | None = None) -> None:
        """Send header (+ payload) to `dst` without waiting, unless max_in_flight are pending."""
        tensors = [header.to_tensor(self.device)]
        if payload is not None:
            tensors.append(payload.contiguous())
        works = [self._post(dist.isend, t, dst) for t in tensors]
        what = header.describe() if isinstance(header, DataHeader) else "request"
        self._pending.append(_Pending(dst, works, tensors, what))
        self.messages_sent += 1
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        if len(self._pending) > self.max_in_flight:
            t0 = time.perf_counter()
            while len(self._pending) > self.max_in_flight:
                self._wait_oldest(self.send_timeout_s)
            self.send_wait_s += time.perf_counter() - t0

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every sent message was received (or fail naming the peer)."""
        while self._pending:
            self._wait_oldest(self.send_timeout_s if timeout_s is None else timeout_s)

    def _wait_oldest(self, timeout_s: float) -> None:
        p = self._pending.popleft()
        deadline = time.monotonic() + timeout_s
        for w in p.works:
            self._wait(w, p.dst, deadline,
                       lambda: f"{self.describe(p.dst)} did not receive the {p.what} within {timeout_s:.0f} s")

    def send_error(self, dst: int, message: str | Exception, timeout_s: float = 5.0) -> None:
        """Best effort: tell `dst` why this rank fails (never raises). A `PeerDied` tells it who died."""
        if isinstance(message, PeerDied):
            message = f"{DIED_PREFIX}{','.join(map(str, message.ranks))}:{message}"
        elif isinstance(message, Exception):
            message = f"{type(message).__name__}: {message}"
        try:
            data = torch.tensor(list(message.encode()[:4000]), dtype=torch.uint8).to(self.device)
            header = DataHeader(kind=ERROR, rows=int(data.numel()))
            works = [dist.isend(header.to_tensor(self.device), dst), dist.isend(data, dst)]
            deadline = time.monotonic() + timeout_s
            for w in works:
                self._wait(w, dst, deadline, lambda: "")
        except Exception:  # the peer may be gone too
            pass

    # ------------------------------------------------------------------ receiving
    def recv_header(self, src: int, timeout_s: float, waiting_for: str) -> DataHeader:
        """Receive the next header from `src`; ERROR messages raise PeerError with the peer's text."""
        buf = torch.empty(HEADER_SIZE, dtype=torch.int64, device=self.device)
        self._recv(buf, src, timeout_s, waiting_for)
        header = DataHeader.from_tensor(buf)
        if header.kind == ERROR:
            text = torch.empty(header.rows, dtype=torch.uint8, device=self.device)
            self._recv(text, src, timeout_s, "the error message")
            message = bytes(text.cpu().tolist()).decode(errors="replace")
            if message.startswith(DIED_PREFIX):  # the sender blames peers of its own that died
                ranks, _, detail = message[len(DIED_PREFIX):].partition(":")
                dead = [int(r) for r in ranks.split(",")]
                raise PeerDied(dead, f"{detail.strip()} (reported by {self.describe(src)})")
            raise PeerError(f"{self.describe(src)} failed: {message}")
        return header

    def recv_request(self, src: int, timeout_s: float) -> Request:
        buf = torch.empty(HEADER_SIZE, dtype=torch.int64, device=self.device)
        self._recv(buf, src, timeout_s, "its request")
        return Request.from_tensor(buf)

    def post_recv_header(self, src: int) -> PendingHeader:
        """Start receiving the next header from `src` without waiting (polled with `PendingHeader.ready`)."""
        buf = torch.empty(HEADER_SIZE, dtype=torch.int64, device=self.device)
        return PendingHeader(self, src, buf, self._post(dist.irecv, buf, src))

    def recv_payload(self, src: int, out: Tensor, timeout_s: float, waiting_for: str) -> Tensor:
        """Receive into the preallocated `out` (shape and dtype agreed through the header)."""
        self._recv(out, src, timeout_s, waiting_for)
        return out

    def _recv(self, buf: Tensor, src: int, timeout_s: float, waiting_for: str) -> None:
        work = self._post(dist.irecv, buf, src)
        self._wait(work, src, time.monotonic() + timeout_s,
                   lambda: f"{self.describe(src)} sent nothing for {timeout_s:.0f} s (waiting for {waiting_for})")

    def _post(self, op: Callable[..., Any], tensor: Tensor, peer: int) -> Any:
        """Start an isend / irecv; a connection already known to be closed raises PeerError."""
        try:
            return op(tensor, peer)
        except RuntimeError as e:
            raise self._unreachable(peer, e) from e

    def _unreachable(self, peer: int, error: Exception) -> PeerError:
        """A closed connection while talking to `peer`: name who died. gloo fails every pending operation
        of a process when any of its connections closes, so the culprit is found among `peer` and the
        ranks that compute with it (`peers_of`): those that never check in and whose heartbeat stopped
        (see `silent_peers`)."""
        first = str(error).splitlines()[0][:300]
        me = dist.get_rank() if dist.is_initialized() else -1
        group = [me, *(r for r in self.peers_of(peer) if r != me)]
        dead, _, said = silent_peers(group, me, PeerError(f"the connection to {self.describe(peer)} closed"),
                                     self.blame_wait_s)
        if dead:
            return PeerDied(dead, f"{', '.join(self.describe(r) for r in dead)} died or hangs: no word from it within "
                                  f"{self.blame_wait_s:.0f} s after {self.describe(me)} lost its connection ({first}); "
                                  "see its log")
        if peer in said:
            return PeerError(f"{self.describe(peer)} failed: {said[peer].reason}")
        return PeerError(f"{self.describe(peer)} is unreachable (connection closed: the rank probably died): {first}")

    def _wait(self, work: Any, peer: int, deadline: float, timeout_message: Callable[[], str]) -> None:
        """Wait for `work` until `deadline`; timeouts and closed connections raise PeerError."""
        try:
            if self.device.type == "cpu":  # gloo: a blocking wait with a timeout
                left = max(deadline - time.monotonic(), 0.001)
                work.wait(timeout=timedelta(seconds=left))
                return
            while not work.is_completed():  # nccl: wait() only orders streams; poll instead
                if time.monotonic() > deadline:
                    raise PeerError(timeout_message())
                time.sleep(0.0002)
            work.wait()
        except PeerError:
            raise
        except RuntimeError as e:
            text = str(e)
            if "Timed out" in text or "timed out" in text:
                raise PeerError(timeout_message()) from None
            raise self._unreachable(peer, e) from e


@dataclass
class PendingHeader:
    """A header receive in progress (see `Transport.post_recv_header`)."""

    transport: Transport
    src: int
    buf: Tensor
    work: Any

    def ready(self) -> bool:
        """Whether the header has arrived (never blocks)."""
        return bool(self.work.is_completed())

    def wait(self, timeout_s: float, waiting_for: str) -> DataHeader:
        """The header, once it arrives within `timeout_s` (else PeerError naming the peer)."""
        t = self.transport
        t._wait(self.work, self.src, time.monotonic() + timeout_s,
                lambda: f"{t.describe(self.src)} sent nothing for {timeout_s:.0f} s (waiting for {waiting_for})")
        return DataHeader.from_tensor(self.buf)
