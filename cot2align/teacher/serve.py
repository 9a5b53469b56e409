"""The serve loop of the teacher ranks: run the teacher, send response states to the students.

Every rank of a teacher replica walks the same schedule: for each step, each
accumulation index, each student the replica serves and each format that student
asked for, run the teacher forward on that micro-batch (derived from the shared
sampler: no data crosses the wire) and let the rank that owns a served layer send
its packed response states to the student (hf backend: the replica's single rank;
megatron backend: tp-rank 0 of the pipeline stage owning the layer). Sends are
asynchronous with at most `prefetch` micro-batches in flight per rank, so the teacher
computes ahead while the students train.

The teacher knows nothing about losses: what to serve (layers, formats, first and
last step) comes from each student's `Request`.
"""

from __future__ import annotations

import os
import resource
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cot2align.data.dataset import Sample, SeqBatch, collate
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.distributed.topology import Topology
from cot2align.distributed.transport import (
    DATA,
    DONE,
    END,
    FORMATS,
    STOP,
    DataHeader,
    DesyncError,
    PendingHeader,
    Request,
    Transport,
    any_rank,
    checksum,
    pack,
)
from cot2align.models import frozen, num_layers, response_view

FAULT_ENV = "COT2ALIGN_FAULT"
"""Fault injection for tests: "exit:<rank>:<n>" makes teacher rank <rank> exit (os._exit) right
after its n-th sent message, as a crashed node would; "hang:<rank>:<n>" makes it stop sending."""


class HiddenStates(Protocol):
    """A teacher replica's forward pass as seen from one of its ranks."""

    num_layers: int

    def hidden(self, seq: SeqBatch, layers: list[int]) -> dict[int, Tensor]:
        """Run the forward on `seq` (every rank of the replica, same batch) and return the
        response states [B, N, d] (gathered at seq.resp_index) of the layers THIS rank sends."""
        ...


class HFHiddenStates:
    """hf backend: the whole HF teacher on one rank per replica (which sends every layer)."""

    def __init__(self, model: nn.Module, device: torch.device, autocast: AbstractContextManager[Any] | None = None
                 ) -> None:
        self.model = frozen(model.to(device))
        self.device = device
        self.num_layers = num_layers(model)  # type: ignore[arg-type]
        self.autocast = autocast

    @torch.no_grad()
    def hidden(self, seq: SeqBatch, layers: list[int]) -> dict[int, Tensor]:
        with self.autocast or nullcontext():
            return response_view(self.model, seq.to(self.device), layers).hidden  # type: ignore[arg-type]


class MegatronHiddenStates:
    """megatron backend: one TP x PP shard of the teacher; tp-rank 0 of each stage sends the
    layers that stage owns."""

    def __init__(self, teacher: Any, sends: bool) -> None:
        self.teacher = teacher
        self.sends = sends
        self.num_layers = int(teacher.num_layers)

    @torch.no_grad()
    def hidden(self, seq: SeqBatch, layers: list[int]) -> dict[int, Tensor]:
        full = self.teacher.forward_hidden(seq.input_ids, seq.attention_mask, layers)  # {layer: [B, T, d]}
        if not self.sends:
            return {}
        out = {}
        for layer, h in full.items():
            idx = seq.resp_index.to(h.device)
            out[layer] = torch.gather(h, 1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return out


@dataclass
class ServeStats:
    """What one teacher rank did (for logs and the benchmark)."""

    forwards: int = 0
    messages: int = 0
    bytes_sent: int = 0
    rows_sent: int = 0
    """Response positions sent (summed over messages, not layers)."""
    seconds: float = 0.0
    busy_seconds: float = 0.0
    """Time in teacher forward passes (the rest: waiting for students, start-up)."""
    peak_rss_mb: float = 0.0
    stopped_at: int | None = None
    """The step the students stopped after when they stopped early (preemption), else None."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux VmHWM: unlike ru_maxrss it does not
    inherit the launching process's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fault(rank: int, messages: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    kind, r, n = spec.split(":")
    if int(r) == rank and messages >= int(n):
        if kind == "exit":
            os._exit(17)
        if kind == "hang":
            time.sleep(3600)


class _StopCheck:
    """Whether the students asked to stop: polled before each micro-batch; the ranks of a
    sharded replica agree (an all-reduce over its model-parallel group) so that they all leave
    the forward schedule at the same micro-batch."""

    def __init__(self, control: dict[int, PendingHeader], replica_group: Any, device: torch.device) -> None:
        self.control = control
        self.group = replica_group
        self.device = device

    def __call__(self) -> bool:
        flag = any(p.ready() for p in self.control.values())
        return flag if self.group is None else any_rank(flag, self.group, self.device)


IDLE_WAIT_S = 366 * 24 * 3600.0
"""How long a teacher with nothing to serve waits for its students to finish (they may train for
days; a student that dies closes its connection, which ends the wait at once)."""


def _last_words(control: dict[int, PendingHeader], timeout_s: float, transport: Transport) -> int | None:
    """Wait for every student's DONE / STOP; returns the step they stopped after (None: done)."""
    stopped_at = None
    for student, pending in control.items():
        answer = pending.wait(timeout_s, "its last message (done or stop)")
        if answer.kind == STOP:
            stopped_at = answer.step
        elif answer.kind != DONE:
            raise DesyncError(f"{transport.describe(student)} sent {answer.describe()} at the end of the run "
                              "(expected done or stop)")
    return stopped_at


def _agree(requests: dict[int, Request], describe: Any) -> Request:
    """All students of a replica must ask for the same schedule."""
    (first_rank, first), *rest = requests.items()
    for rank, req in rest:
        if req != first:
            raise DesyncError(f"{describe(rank)} requested {req}, but {describe(first_rank)} requested {first}")
    return first


def serve(*, topo: Topology, transport: Transport, states: HiddenStates, samples: list[Sample],
          pad_ids: dict[str, int], seed: int, prefetch: int, wire_dtype: torch.dtype,
          request_timeout_s: float) -> ServeStats:
    """Serve this rank's replica's students until the last step, or until they stop early
    (see the module docstring)."""
    t0 = time.perf_counter()
    stats = ServeStats()
    replica = topo.teacher_coord().replica
    students = topo.students_of(replica)
    busy = 0.0
    try:
        req = _agree({s: transport.recv_request(s, request_timeout_s) for s in students}, transport.describe)
        control = {s: transport.post_recv_header(s) for s in students}  # DONE or STOP, see transport
        if not req.layers:  # nothing to serve (e.g. sft): wait for the students' last word
            stats.stopped_at = _last_words(control, IDLE_WAIT_S, transport)
            return stats
        stop = _StopCheck(control, topo.teacher_groups().mp if topo.tp * topo.pp > 1 else None,
                          transport.device)
        sampler = GlobalBatchSampler(len(samples), req.micro_batch, req.accum, topo.dp, seed)
        mine = (len(samples), seed, topo.dp)
        if mine != (req.num_samples, req.seed, req.dp):
            raise DesyncError(f"teacher rank {topo.rank} has (samples, seed, dp) = {mine}, the students "
                              f"{(req.num_samples, req.seed, req.dp)}: they must build the same data")
        layers = list(req.layers)
        sends = [x for x in layers if topo.sender_rank(replica, x, states.num_layers) == topo.rank]
        transport.max_in_flight = max(0, prefetch) * len(req.fmts) * max(1, len(students))
        for step, micro in ((s, m) for s in range(req.first_step, req.total_steps) for m in range(req.accum)):
            if stop():
                break
            for student in students:
                idx = sampler.micro_batches(step, topo.student_index(student))[micro]
                batch = collate([samples[i] for i in idx], pad_ids, req.fmts)
                for fmt in [f for f in req.fmts if f in batch.seqs["teacher"]]:
                    seq = batch.seqs["teacher"][fmt]
                    t = time.perf_counter()
                    hidden = states.hidden(seq, layers)
                    busy += time.perf_counter() - t
                    stats.forwards += 1
                    if not sends:
                        continue
                    lengths = seq.resp_mask.sum(dim=1)
                    payload = pack(hidden, seq.resp_mask, sends, wire_dtype)
                    header = DataHeader(kind=DATA, step=step, micro=micro, fmt=FORMATS.index(fmt),
                                        layers=tuple(sends), rows=payload.shape[1], width=payload.shape[2],
                                        lengths_sum=checksum(lengths), indices_sum=checksum(idx),
                                        busy_ms=int(busy * 1000), wait_ms=int(transport.send_wait_s * 1000))
                    transport.send(student, header, payload)
                    stats.rows_sent += payload.shape[1]
                    _fault(topo.rank, transport.messages_sent)
        if sends:
            for student in students:
                transport.send(student, DataHeader(kind=END))
        transport.flush()
        stats.stopped_at = _last_words(control, request_timeout_s, transport)
    except Exception as e:
        for student in students:
            transport.send_error(student, f"{type(e).__name__}: {e}")
        raise
    stats.messages, stats.bytes_sent = transport.messages_sent, transport.bytes_sent
    stats.seconds = time.perf_counter() - t0
    stats.busy_seconds = busy
    stats.peak_rss_mb = peak_rss_mb()
    return stats
