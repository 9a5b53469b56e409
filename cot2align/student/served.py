"""`ServedTeacher`: the `TeacherSource` of a student rank in the served runtime.

Instead of running the teacher, `views` receives the packed response states that the
ranks of this student's teacher replica computed for the same micro-batch. The
student tokenizes the teacher side itself, so it knows every shape in advance; each
message's header is checked against the expected step, micro-batch, format, sample
indices and response lengths. The steps it receives are those of its `start` request, which a
`student.cached.SwitchingTeacher` limits to the first epoch of an auto-cached run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cot2align.data.dataset import Batch
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.data.views import ResponseView
from cot2align.distributed.failures import DesyncError
from cot2align.distributed.transport import (
    DATA,
    DONE,
    END,
    FORMATS,
    STOP,
    DataHeader,
    Request,
    Transport,
    checksum,
    unpack,
)
from cot2align.student.teacher_io import TeacherIO


@dataclass
class Route:
    """One teacher rank that sends this student some of the served layers."""

    rank: int
    layers: list[int]


class ServedTeacher:
    """Receives teacher views from the serving replica (see the module docstring).

    routes(layers) -> which teacher rank sends which of `layers` (the topology's sender map).
    replica_ranks: every rank of the serving replica (all of them get the request).
    """

    def __init__(self, transport: Transport, io: TeacherIO, sampler: GlobalBatchSampler, dp_rank: int,
                 replica_ranks: list[int], routes: dict[int, int], wire_dtype: torch.dtype,
                 timeout_s: float, first_timeout_s: float, seed: int) -> None:
        self.transport = transport
        self.final_layer = io.num_layers
        self.head = io.head
        self.embed = io.embed
        self.width = io.hidden_size
        self.sampler = sampler
        self.dp_rank = dp_rank
        self.replica_ranks = replica_ranks
        self.sender_of = routes
        self.wire_dtype = wire_dtype
        self.view_dtype = next(io.head.parameters()).dtype
        """Views are handed out in the teacher's dtype, as the colocated teacher's would be."""
        self.timeout_s = timeout_s
        self.first_timeout_s = first_timeout_s
        self.seed = seed
        self._cursor = 0
        self._end = 0
        self._layers: list[int] = []
        self._routes: list[Route] = []
        self._received = 0
        self.bytes_received = 0
        """Payload bytes received (headers not counted)."""
        self.positions_received = 0
        """Teacher response positions received (each micro-batch and format once)."""
        self.wait_s = 0.0
        """Time this student spent waiting for teacher states."""
        self._teacher_ms: dict[int, tuple[int, int]] = {}
        """Sending rank -> (forward ms, blocked-send ms) so far, from its latest header."""

    def start(self, first_step: int, total_steps: int, layers: list[int], fmts: list[str]) -> None:
        """Send the request to every rank of the replica (layers empty: nothing to serve)."""
        s = self.sampler
        request = Request(first_step=first_step, total_steps=total_steps, layers=tuple(layers), fmts=tuple(fmts),
                          num_samples=s.num_samples, micro_batch=s.micro_batch, accum=s.accum, dp=s.dp,
                          seed=self.seed)
        for rank in self.replica_ranks:
            self.transport.send(rank, request)
        self.transport.flush(self.first_timeout_s)
        self._layers = list(layers)
        by_rank: dict[int, list[int]] = {}
        for layer in layers:
            by_rank.setdefault(self.sender_of[layer], []).append(layer)
        self._routes = [Route(r, by_rank[r]) for r in sorted(by_rank)]
        self._cursor = first_step * s.accum
        self._end = total_steps * s.accum
        if layers and self._cursor >= self._end:
            self._receive_end()

    @torch.no_grad()
    def views(self, batch: Batch, fmts: list[str], layers: list[int]) -> dict[str, ResponseView]:
        """Receive the teacher's views of `batch` (the next micro-batch of this replica).

        Returns fmt -> ResponseView with hidden[layer] [B, N_t, d] (the teacher's dtype) on the
        batch's device, mask / inputs / targets from the student's own teacher tokenization.
        """
        if sorted(layers) != sorted(self._layers):
            raise ValueError(f"views() asked for teacher layers {layers}, start() requested {self._layers}")
        if self._cursor >= self._end:
            raise DesyncError(f"no micro-batch left to receive (the run ends at step {self._end // self.sampler.accum})")
        step, micro = divmod(self._cursor, self.sampler.accum)
        expected = self.sampler.micro_batches(step, self.dp_rank)[micro]
        if list(batch.indices) != expected:
            raise DesyncError(f"student replica {self.dp_rank}: micro-batch {micro} of step {step} should hold "
                              f"samples {expected[:8]}..., got {list(batch.indices)[:8]}...")
        out = {}
        for fmt in fmts:
            seq = batch.seqs["teacher"][fmt]
            lengths = seq.resp_mask.sum(dim=1).cpu()
            rows = int(lengths.sum())
            want = DataHeader(kind=DATA, step=step, micro=micro, fmt=FORMATS.index(fmt), rows=rows,
                              width=self.width, lengths_sum=checksum(lengths), indices_sum=checksum(batch.indices))
            hidden = {}
            for route in self._routes:
                packed = self._receive(route, want)
                hidden.update(unpack(packed, seq.resp_mask, route.layers, self.view_dtype))
            self.positions_received += rows
            out[fmt] = ResponseView(hidden=hidden, mask=seq.resp_mask, inputs=seq.inputs, targets=seq.targets)
        self._cursor += 1
        if self._cursor == self._end:
            self._receive_end()
        return out

    def _timeout(self) -> float:
        return self.first_timeout_s if self._received == 0 else self.timeout_s

    def _receive(self, route: Route, want: DataHeader) -> torch.Tensor:
        want = DataHeader(**{**want.__dict__, "layers": tuple(route.layers)})
        t0 = time.perf_counter()
        header = self.transport.recv_header(route.rank, self._timeout(), want.describe())
        self.wait_s += time.perf_counter() - t0
        self._teacher_ms[route.rank] = (header.busy_ms, header.wait_ms)
        if header.checked() != want:
            raise DesyncError(f"{self.transport.describe(route.rank)} sent {header.describe()} "
                              f"(checksums {header.lengths_sum}, {header.indices_sum}); this student expected "
                              f"{want.describe()} (checksums {want.lengths_sum}, {want.indices_sum}): teacher and "
                              "student disagree on the data (same data files, tokenizers, seed and batch sizes?)")
        buf = torch.empty((len(route.layers), want.rows, want.width), dtype=self.wire_dtype,
                          device=self.transport.device)
        self.transport.recv_payload(route.rank, buf, self._timeout(), want.describe())
        self._received += 1
        self.bytes_received += buf.numel() * buf.element_size()
        return buf

    def _receive_end(self) -> None:
        for route in self._routes:
            header = self.transport.recv_header(route.rank, self._timeout(), "the end of the run")
            if header.kind != END:
                raise DesyncError(f"{self.transport.describe(route.rank)} sent {header.describe()} after the "
                                  "last micro-batch (expected the end of the run)")
        self._tell_replica(DataHeader(kind=DONE))

    def _tell_replica(self, header: DataHeader) -> None:
        for rank in self.replica_ranks:
            self.transport.send(rank, header)
        self.transport.flush(self.first_timeout_s)

    def done(self) -> None:
        """The run is over for a student that asked for nothing (its replica waits for this word;
        a student that was served says DONE after the replica's END)."""
        if not self._layers:
            self._tell_replica(DataHeader(kind=DONE))

    def stop(self, step: int) -> None:
        """The run stops early after `step` (preemption): tell every rank of the replica, then
        drain the states it had already sent ahead until its END."""
        if not self._layers:
            self._tell_replica(DataHeader(kind=STOP, step=step))
            return
        if self._cursor >= self._end:
            return
        for rank in self.replica_ranks:  # not flushed yet: the senders may be blocked on us
            self.transport.send(rank, DataHeader(kind=STOP, step=step))
        for route in self._routes:
            while True:
                header = self.transport.recv_header(route.rank, self.first_timeout_s, "the end after a stop")
                if header.kind == END:
                    break
                if header.kind != DATA:
                    raise DesyncError(f"{self.transport.describe(route.rank)} sent {header.describe()} while "
                                      "this student was stopping")
                buf = torch.empty((len(header.layers), header.rows, header.width), dtype=self.wire_dtype,
                                  device=self.transport.device)
                self.transport.recv_payload(route.rank, buf, self.first_timeout_s, header.describe())
        self.transport.flush(self.first_timeout_s)
        self._cursor = self._end

    def metrics(self) -> dict[str, float]:
        """Cumulative serving statistics of this student's replica: the teacher's forward time and
        time blocked on full send queues (slowest sending rank), this student's wait for states."""
        busy = max((b for b, _ in self._teacher_ms.values()), default=0) / 1000
        blocked = max((w for _, w in self._teacher_ms.values()), default=0) / 1000
        return {"teacher_forward_s": busy, "teacher_blocked_s": blocked, "student_wait_s": self.wait_s}
