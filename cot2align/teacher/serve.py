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

With the teacher-state cache (`CacheTap`), the sending ranks also store what they serve; after
the last requested step the replica computes the samples that were never served, and the last
writer to finish seals the cache (`_cache_rest`). Under `teacher.cache.mode=auto` the students
request the first epoch of the run only (`student.cached.SwitchingTeacher`): the replica serves
it, completes and seals the cache, receives each student's DONE and returns, while the students
read the remaining epochs from the cache.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cot2align.data.dataset import Sample, SeqBatch, collate
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.distributed.failures import DesyncError, blame
from cot2align.distributed.topology import Topology
from cot2align.distributed.transport import (
    DATA,
    DONE,
    END,
    FORMATS,
    STOP,
    DataHeader,
    PendingHeader,
    Request,
    Transport,
    any_rank,
    checksum,
    pack,
)
from cot2align.models import frozen, num_layers, response_view
from cot2align.teacher.cache import CacheWriter, finalize, required_entries

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


ERROR_LINGER_S = 3.0
"""Seconds a failing teacher rank stays after sending its error to its students (a closed connection
would otherwise reach them first, and they would blame this rank instead of the one it names)."""
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


class CacheTap:
    """Writes what a sending rank serves into the teacher-state cache (`teacher.cache.mode=write`):
    open(requested layers, formats, width) -> this rank's `CacheWriter` (None: this run writes no cache)."""

    def __init__(self, open: Callable[[list[int], list[str], int], CacheWriter | None]) -> None:
        self.open = open
        self.writer: CacheWriter | None = None
        self._opened = False

    def add(self, idx: list[int], fmt: str, layers: list[int], payload: Tensor, lengths: Tensor,
            req: Request) -> None:
        """payload [n_layers, S, d] (this rank's `layers`) of a micro-batch -> one record per sample."""
        if not self._opened:
            self.writer = self.open(list(req.layers), list(req.fmts), int(payload.shape[-1]))
            self._opened = True
        if self.writer is None:
            return
        rows = [int(n) for n in lengths.tolist()]
        for sample, part, n in zip(idx, torch.split(payload, rows, dim=1), rows, strict=True):
            if n:
                self.writer.add(int(sample), fmt, layers, part)


def _cache_rest(tap: CacheTap, topo: Topology, states: HiddenStates, samples: list[Sample], pad_ids: dict[str, int],
                sampler: GlobalBatchSampler, req: Request, sends: list[int], wire_dtype: torch.dtype) -> None:
    """After the last requested step: forward the samples steps [0, req.total_steps) never served (the
    dropped remainder of each epoch, or all the rest of a request shorter than an epoch; steps before
    req.first_step were served and written by the run this one resumes), split over replicas, so the
    cache is complete; then journal and, where every writer is done, seal it (students of an auto run
    wait for that seal). Every rank of a replica walks the same list."""
    served = {i for s in range(req.total_steps) for d in range(topo.dp) for m in sampler.micro_batches(s, d)
              for i in m}
    rest = [i for i in range(len(samples)) if i not in served]
    chunks = [rest[k : k + req.micro_batch] for k in range(0, len(rest), req.micro_batch)]
    replica = topo.teacher_coord().replica
    for idx in chunks[replica :: topo.replicas]:
        batch = collate([samples[i] for i in idx], pad_ids)
        for fmt in [f for f in req.fmts if f in batch.seqs["teacher"]]:
            seq = batch.seqs["teacher"][fmt]
            hidden = states.hidden(seq, list(req.layers))
            if sends:
                tap.add(idx, fmt, sends, pack(hidden, seq.resp_mask, sends, wire_dtype), seq.resp_mask.sum(dim=1), req)
    if tap.writer is not None:
        tap.writer.close()
        finalize(tap.writer.root, tap.writer.key, required_entries([s.paired for s in samples], req.fmts))


def serve(*, topo: Topology, transport: Transport, states: HiddenStates, samples: list[Sample],
          pad_ids: dict[str, int], seed: int, prefetch: int, wire_dtype: torch.dtype,
          request_timeout_s: float, cache: CacheTap | None = None) -> ServeStats:
    """Serve this rank's replica's students until the last requested step (the run's last, or under
    teacher.cache.mode=auto the end of its first epoch), or until they stop early (see the module
    docstring). cache: also write the served states into the teacher-state cache; after the last
    step the samples the run did not serve are computed too and the cache sealed."""
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
        stopped = False
        for step, micro in ((s, m) for s in range(req.first_step, req.total_steps) for m in range(req.accum)):
            if stop():
                stopped = True
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
                    if cache is not None:
                        cache.add(idx, fmt, sends, payload, lengths, req)
                    stats.rows_sent += payload.shape[1]
                    _fault(topo.rank, transport.messages_sent)
        if sends:
            for student in students:
                transport.send(student, DataHeader(kind=END))
        transport.flush()
        if cache is not None and not stopped:  # the students train on; the cache is completed meanwhile
            _cache_rest(cache, topo, states, samples, pad_ids, sampler, req, sends, wire_dtype)
        elif cache is not None and cache.writer is not None:
            cache.writer.close()
        stats.stopped_at = _last_words(control, request_timeout_s, transport)
    except Exception as e:  # a collective of the replica failed: name the rank that died, if one did
        reported = blame(e, topo.teacher_ranks(replica), topo.rank, transport.describe)
        for student in students:
            transport.send_error(student, reported)
        if students:  # the students read the error before this process's connections close
            time.sleep(ERROR_LINGER_S)
        if reported is not e:
            raise reported from e
        raise
    stats.messages, stats.bytes_sent = transport.messages_sent, transport.bytes_sent
    stats.seconds = time.perf_counter() - t0
    stats.busy_seconds = busy
    stats.peak_rss_mb = peak_rss_mb()
    return stats
