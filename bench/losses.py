"""Benchmarks of the OT engine and of every distillation loss on synthetic inputs (CPU).

    python bench/losses.py [--quick] [--threads N (default 1)] [--loss-threads N (default 2)]
                           [--skip-ot | --skip-losses | --only-e2e] [--e2e-threads 1,2] [--e2e-repeats 3]
                           [--out bench/results/losses.json]

"OT engine": the 48 problems of one CoT2Align micro-batch (batch 8 x 3 Cross-CoT pairs
x 2 layers), attention costs between student states and projected teacher states,
solved side by side on identical inputs by: the reference per-sample loop of plain
Sinkhorn with autograd (docs/method.md), our batched engine (several settings), POT's
batched solver and a loop of POT's sinkhorn2. Float64 for the equality columns,
float32 for the timings. "eps sweep": what a smaller epsilon does to the plan.
"OT term end to end": the same problems from their states (student X, projected teacher Y, shared
across pairs as CrossCoTOT shares them), the attention cost computed inside the timed region,
forward + backward to the states, against the reference per-sample loop (cost + Sinkhorn with
autograd), the solver alone on the precomputed costs and the FLOP floor (the cost's products and the
solver's forward matrix-vector products at the rate of the cost's own product measured in the same
run); eps 10 / 100 iterations and eps 0.1, on each of --e2e-threads, methods interleaved, best of N.
"all losses": forward+backward time and peak memory of each `loss.name` at full size, one
fresh process each, against its FLOP floor (`flop_floor`) at the matmul rate measured in the
same run; mined on the real gpt-2 / qwen2 tokenizers of the test-asset cache (never
downloaded here), with its id-map build and DTW alignment times apart.
Prints markdown tables and writes all numbers to JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ot  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from cot2align.configbase import ConfigError  # noqa: E402
from cot2align.losses.base import LossContext, LossInputs, ResponseView  # noqa: E402
from cot2align.losses.config import LossConfig, SinkhornConfig  # noqa: E402
from cot2align.losses.costs import attention_cost  # noqa: E402
from cot2align.losses.registry import build_loss, loss_names  # noqa: E402
from cot2align.losses.sinkhorn import batched_ot, sinkhorn  # noqa: E402

EPS = 10.0
ITERS = 100


@dataclass
class Sizes:
    batch: int
    n_student: int
    n_teacher: int
    spread: int
    d_student: int
    d_teacher: int
    vocab_student: int
    vocab_teacher: int
    repeats: int
    loss_repeats: int


FULL = Sizes(8, 256, 300, 40, 768, 2048, 50_000, 150_000, repeats=5, loss_repeats=2)
QUICK = Sizes(8, 48, 60, 8, 64, 128, 1_000, 3_000, repeats=3, loss_repeats=1)


# ----------------------------------------------------------------------------- problems


def make_costs(sz: Sizes, seed: int = 0) -> list[Tensor]:
    """Attention costs [n, m] (float64) of batch x 3 pairs x 2 layers, from random states and a projector."""
    g = torch.Generator().manual_seed(seed)

    def length(mean: int) -> int:
        return int(mean + torch.randint(-sz.spread, sz.spread + 1, (), generator=g))

    proj = nn.Linear(sz.d_teacher, sz.d_student).double()
    with torch.no_grad():
        proj.weight.copy_(torch.randn(sz.d_student, sz.d_teacher, generator=g, dtype=torch.float64))
        proj.weight.mul_(1.5 / math.sqrt(sz.d_teacher))
        proj.bias.zero_()
    costs = []
    for _ in range(sz.batch):
        n = {f: length(sz.n_student) for f in ("main", "aux")}
        m = {f: length(sz.n_teacher) for f in ("main", "aux")}
        for s_fmt, t_fmt in (("main", "main"), ("aux", "main"), ("main", "aux")):
            for _layer in range(2):
                # scaled so that <x, y> / sqrt(d) has std 3: softmax rows far from uniform
                x = torch.randn(n[s_fmt], sz.d_student, generator=g, dtype=torch.float64) * 2.0
                h = torch.randn(m[t_fmt], sz.d_teacher, generator=g, dtype=torch.float64)
                with torch.no_grad():
                    costs.append(attention_cost(x, proj(h)))
    return costs


# ----------------------------------------------------------------------------- solvers


def reference_loop(costs: list[Tensor], eps: float, iters: int) -> Tensor:
    """The per-sample loop of docs/method.md: K = exp(-C/eps), v = b/(K^T u), u = a/(K v) from u = 1 (POT's
    order, so that unconverged iterates compare exactly), autograd throughout."""
    values = []
    for c in costs:
        n, m = c.shape
        k = torch.exp(-c / eps)
        a = c.new_full((n,), 1.0 / n)
        b = c.new_full((m,), 1.0 / m)
        u = c.new_ones(n)
        for _ in range(iters):
            v = b / (k.T @ u)
            u = a / (k @ v)
        values.append(((u[:, None] * k * v[None, :]) * c).sum())
    return torch.stack(values)


def ours(**overrides: Any) -> Callable[[list[Tensor]], tuple[Tensor, dict[str, Any]]]:
    cfg = SinkhornConfig(**{"epsilon": EPS, "iterations": ITERS, **overrides})

    def run(costs: list[Tensor]) -> tuple[Tensor, dict[str, Any]]:
        res = batched_ot(costs, cfg)
        return res.values, {"iterations": sorted(set(res.iterations)), "steps": res.backward_steps}

    return run


def pot_batch(grad: str) -> Callable[[list[Tensor]], tuple[Tensor, dict[str, Any]]]:
    """POT's batched solver on costs padded to the largest problem (zero marginals on padding)."""

    def run(costs: list[Tensor]) -> tuple[Tensor, dict[str, Any]]:
        n = max(c.shape[0] for c in costs)
        m = max(c.shape[1] for c in costs)
        pad = torch.nn.functional.pad
        big = torch.stack([pad(c, (0, m - c.shape[1], 0, n - c.shape[0])) for c in costs])
        a = torch.stack(
            [pad(c.new_full((c.shape[0],), 1.0 / c.shape[0]), (0, n - c.shape[0])) for c in costs]
        )
        b = torch.stack(
            [pad(c.new_full((c.shape[1],), 1.0 / c.shape[1]), (0, m - c.shape[1])) for c in costs]
        )
        res = ot.solve_batch(big, reg=EPS, a=a, b=b, max_iter=ITERS, tol=0.0, method="sinkhorn", grad=grad)
        return res.value_linear, {}

    return run


def pot_loop(costs: list[Tensor]) -> tuple[Tensor, dict[str, Any]]:
    values = []
    for c in costs:
        a = c.new_full((c.shape[0],), 1.0 / c.shape[0])
        b = c.new_full((c.shape[1],), 1.0 / c.shape[1])
        values.append(ot.sinkhorn2(a, b, c, reg=EPS, numItermax=ITERS, stopThr=0.0, warn=False))
    return torch.stack(values), {}


METHODS: dict[str, Callable[[list[Tensor]], tuple[Tensor, dict[str, Any]]]] = {
    "reference loop (autograd)": lambda cs: (reference_loop(cs, EPS, ITERS), {}),
    "ours unroll": ours(),
    "ours unroll, full reverse pass": ours(truncate_backward=False),
    "ours envelope": ours(gradient="envelope"),
    "ours unroll, early stop 1e-6 (check every 10)": ours(tolerance=1e-6),
    "ours unroll, early stop 1e-6 (check every 2)": ours(tolerance=1e-6, check_every=2),
    "POT solve_batch (autodiff)": pot_batch("autodiff"),
    "POT solve_batch (envelope)": pot_batch("envelope"),
    "POT sinkhorn2 loop": pot_loop,
}
REFERENCE = "reference loop (autograd)"
#: methods slower than this (fwd+bwd, warm-up round) are timed over 2 rounds only
SLOW_MS = 1500.0
#: the reference each method's gradient is compared with (unroll vs unroll, envelope vs envelope)
GRAD_REFERENCE = {
    "ours envelope": "POT solve_batch (envelope)",
    "POT solve_batch (envelope)": "ours envelope",
}


# ----------------------------------------------------------------------------- timing


def _time_once(fn: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """(wall ms, process CPU ms) of fn(*args)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3


def _forward_backward(
    fn: Callable[[list[Tensor]], tuple[Tensor, dict[str, Any]]], leaves: list[Tensor]
) -> None:
    fn(leaves)[0].sum().backward()


def _batched_forward_backward(leaves: list[Tensor], cfg: SinkhornConfig) -> None:
    batched_ot(leaves, cfg).values.sum().backward()


def _loss_forward_backward(loss: nn.Module, inputs: LossInputs) -> None:
    loss(inputs).total.backward()


def bench_engine(sz: Sizes) -> dict[str, Any]:
    costs64 = make_costs(sz)
    costs32 = [c.float() for c in costs64]
    out: dict[str, Any] = {
        "problems": len(costs64),
        "mean_n": statistics.mean(c.shape[0] for c in costs64),
        "mean_m": statistics.mean(c.shape[1] for c in costs64),
    }
    # equality in float64: values and gradients against the reference loop
    results: dict[str, dict[str, Any]] = {}
    ref_vals: Tensor | None = None
    grads: dict[str, list[Tensor]] = {}
    for name, fn in METHODS.items():
        leaves = [c.detach().clone().requires_grad_(True) for c in costs64]
        vals, info = fn(leaves)
        vals.sum().backward()
        grads[name] = [leaf.grad for leaf in leaves if leaf.grad is not None]
        if ref_vals is None:
            ref_vals = vals.detach()
        rel = ((vals.detach() - ref_vals).abs() / ref_vals.abs()).max().item()
        results[name] = {"max_rel_diff_values": rel, **info}
    for name in METHODS:
        other = GRAD_REFERENCE.get(name, REFERENCE)
        num = max((a - b).abs().max().item() for a, b in zip(grads[name], grads[other]))
        den = max(b.abs().max().item() for b in grads[other])
        results[name]["max_rel_diff_grad"] = num / den
        results[name]["grad_compared_with"] = other
    # timings in float32, methods interleaved round by round
    samples: dict[str, dict[str, list[float]]] = {
        n: {"fwd": [], "fwd_cpu": [], "fb": [], "fb_cpu": []} for n in METHODS
    }
    rounds = {name: sz.repeats for name in METHODS}
    for rep in range(sz.repeats + 1):
        for name, fn in METHODS.items():
            if rep > rounds[name]:
                continue
            leaves = [c.detach().clone().requires_grad_(True) for c in costs32]
            wall, cpu = _time_once(fn, leaves)
            leaves = [c.detach().clone().requires_grad_(True) for c in costs32]
            fb_wall, fb_cpu = _time_once(_forward_backward, fn, leaves)
            if rep == 0 and fb_wall > SLOW_MS and name != REFERENCE:
                rounds[name] = 2  # slow baselines: median of 2 rounds keeps the full run short
            if rep > 0:  # the first round warms up
                s = samples[name]
                s["fwd"].append(wall)
                s["fwd_cpu"].append(cpu)
                s["fb"].append(fb_wall)
                s["fb_cpu"].append(fb_cpu)
    for name, s in samples.items():
        for key, series in s.items():
            results[name][f"{key}_ms"] = statistics.median(series)
        results[name]["fb_min_ms"] = min(s["fb"])
    loop_fb = results[REFERENCE]["fb_ms"]
    pot_fb = results["POT solve_batch (autodiff)"]["fb_ms"]
    for r in results.values():
        r["speedup_vs_loop"] = loop_fb / r["fb_ms"]
        r["speedup_vs_pot_batch"] = pot_fb / r["fb_ms"]
    out["methods"] = results
    return out


def bench_eps(sz: Sizes) -> list[dict[str, Any]]:
    """For each epsilon: value, plan entropy / log(nm) (1 = product plan), max entry * nm, path, time."""
    costs64 = make_costs(sz)
    costs32 = [c.float() for c in costs64]
    rows = []
    for eps in (10.0, 1.0, 0.1, 0.01):
        row: dict[str, Any] = {"epsilon": eps}
        ent, peak, gap, value = [], [], [], []
        for c in costs64:
            res = sinkhorn(c[None], epsilon=eps, max_iter=ITERS)
            p = res.plan[0]
            nm = p.numel()
            ent.append(float(-(p * p.clamp_min(1e-300).log()).sum() / math.log(nm)))
            peak.append(float(p.max() * nm))
            value.append(float(res.value[0]))
            gap.append(float(res.value[0] / c.mean()))
        row.update(
            mean_value=statistics.mean(value),
            value_over_product_plan=statistics.mean(gap),
            plan_entropy_normalised=statistics.mean(ent),
            plan_max_entry_times_nm=statistics.mean(peak),
        )
        cfg = SinkhornConfig(epsilon=eps, iterations=ITERS)
        conv = batched_ot(
            costs64, SinkhornConfig(epsilon=eps, iterations=1000, tolerance=1e-6, check_every=1)
        )
        row["iterations_to_tol_1e-6"] = max(conv.iterations)
        row["tol_reached"] = max(conv.iterations) < 1000
        v64 = batched_ot(costs64, cfg).values
        res32 = batched_ot(costs32, cfg)
        paths = {
            "log" if log else ("plain f64" if dt == torch.float64 else "plain f32")
            for log, dt in zip(res32.log_domain, res32.dtypes)
        }
        row["float32_input_path"] = "/".join(sorted(paths))
        row["max_rel_diff_float32_vs_float64"] = (
            ((res32.values.double() - v64).abs() / v64.abs()).max().item()
        )
        times: list[float] = []
        while len(times) < max(1, sz.repeats // 2) and sum(times) < SLOW_MS:
            leaves = [c.detach().clone().requires_grad_(True) for c in costs32]
            wall, _ = _time_once(_batched_forward_backward, leaves, cfg)
            times.append(wall)
        row["fb_ms_float32"] = statistics.median(times)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- OT term end to end

#: the end-to-end settings: (label, epsilon, iterations, tolerance of our early-stopping row)
E2E_SETTINGS = [("reference eps 10, 100 iterations", 10.0, 100, 1e-6), ("informative eps 0.1", 0.1, 100, 1e-6)]
PAIR_FORMATS = (("main", "main"), ("aux", "main"), ("main", "aux"))


def make_states(sz: Sizes, seed: int = 0) -> list[dict[tuple[str, int], tuple[Tensor, Tensor]]]:
    """Per example: (format, layer) -> (student states X [n, d_s], projected teacher states Y [m, d_s])
    (float64), the inputs of the OT term's 3 pairs x 2 layers; X and Y as `make_costs` draws them."""
    g = torch.Generator().manual_seed(seed)

    def length(mean: int) -> int:
        return int(mean + torch.randint(-sz.spread, sz.spread + 1, (), generator=g))

    out = []
    for _ in range(sz.batch):
        n = {f: length(sz.n_student) for f in ("main", "aux")}
        m = {f: length(sz.n_teacher) for f in ("main", "aux")}
        # <x, y> / sqrt(d) with std 3: softmax rows far from uniform, like make_costs
        out.append(
            {
                (f, layer): (
                    torch.randn(n[f], sz.d_student, generator=g, dtype=torch.float64) * 2.0,
                    torch.randn(m[f], sz.d_student, generator=g, dtype=torch.float64) * 1.5,
                )
                for f in ("main", "aux")
                for layer in range(2)
            }
        )
    return out


def state_problems(
    states: list[dict[tuple[str, int], tuple[Tensor, Tensor]]], dtype: torch.dtype
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """Fresh leaves (every X and Y once, requires_grad) and the 48 (X, Y) problems sharing them the way
    CrossCoTOT does: X of a format is used by every pair with that student format, Y likewise."""
    leaves: list[Tensor] = []
    problems: list[tuple[Tensor, Tensor]] = []
    for ex in states:
        xs = {k: v[0].to(dtype).requires_grad_(True) for k, v in ex.items()}
        ys = {k: v[1].to(dtype).requires_grad_(True) for k, v in ex.items()}
        leaves += [*xs.values(), *ys.values()]
        for s_fmt, t_fmt in PAIR_FORMATS:
            for layer in range(2):
                problems.append((xs[(s_fmt, layer)], ys[(t_fmt, layer)]))
    return leaves, problems


def reference_end_to_end(problems: list[tuple[Tensor, Tensor]], eps: float, iters: int) -> Tensor:
    """The per-sample loop end to end: each problem's attention cost from its states, then the
    reference Sinkhorn loop, autograd throughout."""
    return reference_loop([attention_cost(x, y) for x, y in problems], eps, iters)


def e2e_methods(eps: float, iters: int, tol: float) -> dict[str, Callable[[list[tuple[Tensor, Tensor]]], Any]]:
    """name -> fn(problems) -> (values [P], BatchedOTResult or None) of the end-to-end rows."""

    def ours(**kw: Any) -> Callable[[list[tuple[Tensor, Tensor]]], Any]:
        cfg = SinkhornConfig(**{"epsilon": eps, "iterations": iters, **kw})

        def run(problems: list[tuple[Tensor, Tensor]]) -> Any:
            res = batched_ot(problems, cfg, "attention")
            return res.values, res

        return run

    return {
        "reference loop (autograd)": lambda ps: (reference_end_to_end(ps, eps, iters), None),
        "ours unroll": ours(),
        "ours envelope": ours(gradient="envelope"),
        f"ours unroll, early stop {tol:g}": ours(tolerance=tol),
    }


def cost_gflops(sz: Sizes, repeats: int = 3) -> tuple[float, float]:
    """Best fp32 GFLOP/s of the cost's own product, [8, n, d_s] x [8, d_s, m] (this process, these threads),
    by wall time and by process CPU time."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, sz.n_student, sz.d_student, generator=g)
    y = torch.randn(8, sz.d_student, sz.n_teacher, generator=g)
    wall = cpu = math.inf
    for _ in range(repeats + 1):
        w, c = _time_once(torch.bmm, x, y)
        wall, cpu = min(wall, w), min(cpu, c)
    flop = 2.0 * 8 * sz.n_student * sz.d_student * sz.n_teacher
    return flop / wall / 1e6, flop / max(cpu, 1e-3) / 1e6


def _e2e_forward_backward(fn: Callable[[list[tuple[Tensor, Tensor]]], Any], problems: list[Any]) -> None:
    fn(problems)[0].sum().backward()


def bench_end_to_end(sz: Sizes, threads: list[int], repeats: int) -> dict[str, Any]:
    """The OT term end to end (states in, attention cost inside the timed region, forward + backward) against
    the reference per-sample loop, the solver alone on the same costs, and the FLOP floor; per thread count."""
    states = make_states(sz)
    _, probs64 = state_problems(states, torch.float64)
    sizes = [(x.shape[0], y.shape[0]) for x, y in probs64]
    out: dict[str, Any] = {
        "problems": len(sizes),
        "mean_n": statistics.mean(n for n, _ in sizes),
        "mean_m": statistics.mean(m for _, m in sizes),
        "d": sz.d_student,
        "cost_gflop": sum(6.0 * n * m * sz.d_student for n, m in sizes) / 1e9,
        "settings": [],
    }
    for label, eps, iters, tol in E2E_SETTINGS:
        methods = e2e_methods(eps, iters, tol)
        setting: dict[str, Any] = {"label": label, "epsilon": eps, "iterations": iters, "methods": {}}
        # equality in float64, against the reference loop (values and gradients w.r.t. every state)
        ref_vals: Tensor | None = None
        ref_grads: list[Tensor] = []
        for name, fn in methods.items():
            leaves, problems = state_problems(states, torch.float64)
            vals, res = fn(problems)
            grads = torch.autograd.grad(vals.sum(), leaves)
            row: dict[str, Any] = {}
            if ref_vals is None:
                ref_vals, ref_grads = vals.detach(), list(grads)
            row["max_rel_diff_values"] = ((vals.detach() - ref_vals).abs() / ref_vals.abs()).max().item()
            # the envelope gradient is that of the entropic objective, not of <P, C>: not comparable
            row["max_rel_diff_grad"] = None if "envelope" in name else max(
                ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref_grads)
            )
            if res is not None:
                row["iterations"] = sorted(set(res.iterations))
                assert res.entropy_ratio is not None
                row["plan_entropy_normalised"] = res.entropy_ratio.mean().item()
            setting["methods"][name] = row
        for nthreads in threads:
            torch.set_num_threads(nthreads)
            rates: list[tuple[float, float]] = []
            timing: dict[str, list[float]] = {name: [] for name in methods}
            timing_cpu: dict[str, list[float]] = {name: [] for name in methods}
            solver: dict[str, list[float]] = {name: [] for name in methods if name.startswith("ours")}
            loads = [os.getloadavg()[0]]
            for _rep in range(repeats + 1):  # interleaved rounds; the first warms up
                rates.append(cost_gflops(sz, repeats=1))
                for name, fn in methods.items():
                    _, problems = state_problems(states, torch.float32)
                    wall, cpu = _time_once(_e2e_forward_backward, fn, problems)
                    timing[name].append(wall)
                    timing_cpu[name].append(cpu)
                    if name in solver:  # the solver alone on the same (precomputed) costs
                        with torch.no_grad():
                            costs = [attention_cost(x, y) for x, y in problems]
                        cfg = SinkhornConfig(
                            epsilon=eps,
                            iterations=iters,
                            gradient="envelope" if "envelope" in name else "unroll",
                            tolerance=tol if "early" in name else 0.0,
                        )
                        leaves = [c.requires_grad_(True) for c in costs]
                        solver[name].append(_time_once(_batched_forward_backward, leaves, cfg)[0])
                loads.append(os.getloadavg()[0])
            gflops = max(r[0] for r in rates)
            gflops_cpu = max(r[1] for r in rates)
            best = {name: min(t[1:]) for name, t in timing.items()}
            best_cpu = {name: min(t[1:]) for name, t in timing_cpu.items()}
            iters_run = {
                name: max(setting["methods"][name].get("iterations", [iters])) for name in methods
            }
            per_thread: dict[str, Any] = {
                "threads": nthreads,
                "cost_gflops": gflops,
                "cost_gflops_cpu": gflops_cpu,
                "load_average": loads,
            }
            for name in methods:
                # the floor: the cost's products (forward 2nmd, backward 4nmd) and the solver's forward
                # matrix-vector products (4nm per iteration run), at this run's rate for the cost's product
                flop = sum(6.0 * n * m * sz.d_student + 4.0 * n * m * iters_run[name] for n, m in sizes)
                floor_ms = flop / (gflops * 1e9) * 1e3
                per_thread[name] = {
                    "fb_ms": best[name],
                    "fb_ms_all": timing[name][1:],
                    "x_reference": best[REFERENCE] / best[name],
                    "floor_ms": floor_ms,
                    "x_floor": best[name] / floor_ms,
                    # process CPU time: what this process computed, less sensitive to other jobs on the cores
                    "fb_cpu_ms": best_cpu[name],
                    "x_reference_cpu": best_cpu[REFERENCE] / best_cpu[name],
                    "floor_cpu_ms": flop / (gflops_cpu * 1e9) * 1e3,
                    "x_floor_cpu": best_cpu[name] / (flop / (gflops_cpu * 1e9) * 1e3),
                    "solver_only_fb_ms": min(solver[name][1:]) if name in solver else None,
                }
            setting[f"threads_{nthreads}"] = per_thread
        out["settings"].append(setting)
    torch.set_num_threads(threads[0])
    return out


# ----------------------------------------------------------------------------- all losses


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM (peak RSS) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def make_loss_inputs(
    sz: Sizes,
    s_layers: list[int],
    t_layers: list[int],
    heads: dict[str, Callable[[Tensor], Tensor]],
    texts: tuple[list[list[int]], list[list[int]]] | None = None,
) -> LossInputs:
    """Synthetic LossInputs; `texts` = (student id rows, teacher id rows) of real text for the
    main format (row b: its tokens, inputs = row[:-1], targets = row[1:]); random ids otherwise."""
    g = torch.Generator().manual_seed(1)
    s_final, t_final = 12, 24
    paired = [i < sz.batch - 2 for i in range(sz.batch)]  # the last two rows are unpaired

    def view(
        mean: int, d: int, vocab: int, layers: list[int], final: int, aux: bool, student: bool
    ) -> ResponseView:
        lengths = [
            (int(mean + torch.randint(-sz.spread, sz.spread + 1, (), generator=g)) if (p or not aux) else 0)
            for p in paired
        ]
        rows = None if texts is None or aux else texts[0 if student else 1]
        if rows is not None:
            lengths = [len(r) - 1 for r in rows]
        n = max(lengths)
        mask = torch.arange(n) < torch.tensor(lengths)[:, None]
        resolved = sorted({final if layer == -1 else layer for layer in layers})
        hidden = {
            layer: (
                torch.randn(sz.batch, n, d, generator=g).requires_grad_(True)
                if student
                else torch.randn(sz.batch, n, d, generator=g).to(torch.bfloat16)
            )
            for layer in resolved
        }
        if rows is not None:
            full = torch.zeros(sz.batch, n + 1, dtype=torch.long)
            for b, r in enumerate(rows):
                full[b, : len(r)] = torch.tensor(r)
            return ResponseView(hidden=hidden, mask=mask, inputs=full[:, :-1] * mask, targets=full[:, 1:] * mask)
        ids = torch.randint(0, vocab, (sz.batch, n), generator=g) * mask
        return ResponseView(hidden=hidden, mask=mask, inputs=ids, targets=ids.roll(-1, 1) * mask)

    student = {
        f: view(
            sz.n_student if f == "main" else sz.n_student * 3 // 4,
            sz.d_student,
            sz.vocab_student,
            s_layers,
            s_final,
            f == "aux",
            True,
        )
        for f in ("main", "aux")
    }
    teacher = {
        f: view(
            sz.n_teacher if f == "main" else sz.n_teacher * 3 // 4,
            sz.d_teacher,
            sz.vocab_teacher,
            t_layers,
            t_final,
            f == "aux",
            False,
        )
        for f in ("main", "aux")
    }
    n_main = student["main"].mask.shape[1]
    logits = torch.randn(sz.batch, n_main, sz.vocab_student, generator=g).requires_grad_(True)
    return LossInputs(
        student=student,
        teacher=teacher,
        student_logits=logits,
        student_final=s_final,
        teacher_final=t_final,
        student_head=heads["student_head"],
        teacher_head=heads["teacher_head"],
        student_embed=heads["student_embed"],
        teacher_embed=heads["teacher_embed"],
        num_tokens=float(student["main"].mask.sum()),
        num_examples=float(sz.batch),
    )


#: real tokenizers for mined (student, teacher), prepared by scripts/prepare_test_assets.py
TOKENIZERS = ROOT / ".cache" / "test-assets" / "tokenizers"
MINED_PAIR = ("gpt-2", "qwen2")


def load_tokenizers() -> tuple[Any, Any] | str:
    """(student, teacher) HF tokenizers from the test-asset cache, or why they are missing (never downloads)."""
    folders = [TOKENIZERS / name for name in MINED_PAIR]
    missing = [str(f) for f in folders if not (f / ".prepared").exists()]
    if missing:
        return f"skipped: real tokenizers missing ({', '.join(missing)}); run python scripts/prepare_test_assets.py"
    from transformers import AutoTokenizer

    student, teacher = (AutoTokenizer.from_pretrained(str(f), local_files_only=True) for f in folders)
    return student, teacher


def text_rows(sz: Sizes, student: Any, teacher: Any) -> tuple[list[list[int]], list[list[int]]]:
    """Main-format token rows of real text for both tokenizers: row b = a window of ~n_student + 1
    student tokens (seeded lengths) of fixed English prose with some code (the Python language
    reference topics shipped with the interpreter, `pydoc_data.topics`: offline, unchanged between
    runs), and the teacher's tokens of the same text."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))[:200_000]
    corpus = student(text, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(2)
    s_rows, t_rows = [], []
    for b in range(sz.batch):
        n = int(sz.n_student + torch.randint(-sz.spread, sz.spread + 1, (), generator=g)) + 1
        at = (b * 997) % max(len(corpus) - n, 1)
        ids = (corpus * (1 + n // max(len(corpus), 1)))[at : at + n]
        s_rows.append(ids)
        t_rows.append(teacher(student.decode(ids), add_special_tokens=False)["input_ids"])
    return s_rows, t_rows


def flop_floor(name: str, inputs: LossInputs, ctx: LossContext, aligned: int | None) -> float | None:
    """FLOPs of the vocabulary-sized products a loss cannot avoid (None: it has none).

    A [P, d] x [d, V] product is 2 P d V. Teacher head products need no weight gradient
    (frozen). uld: teacher logits at the kept positions; mined: at the aligned positions;
    multilevel_ot: at all teacher positions; dskd: teacher logits, s2t logits and their input
    gradient at all teacher positions, plus t2s logits and their input gradient at all student
    positions (W_S frozen in that product).
    """
    t_s = int(inputs.student["main"].mask.sum())
    t_t = int(inputs.teacher["main"].mask.sum())
    kept = int(torch.minimum(inputs.student["main"].lengths, inputs.teacher["main"].lengths).sum())
    head_t = 2.0 * ctx.d_teacher * ctx.vocab_teacher
    head_s = 2.0 * ctx.d_student * ctx.vocab_student
    if name == "uld":
        return kept * head_t
    if name == "mined" and aligned is not None:
        return aligned * head_t
    if name == "multilevel_ot":
        return t_t * head_t
    if name == "dskd":
        return 3 * t_t * head_t + 2 * t_s * head_s
    return None


def matmul_gflops(sz: Sizes, repeats: int = 3) -> float:
    """Best fp32 GFLOP/s of a [256, d_T] x [d_T, V_T] product (the teacher head's shape), this process."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, sz.d_teacher, generator=g)
    w = torch.randn(sz.vocab_teacher, sz.d_teacher, generator=g)
    best = math.inf
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * x.shape[0] * sz.d_teacher * sz.vocab_teacher / best / 1e9


def _mined_context(ctx: LossContext, sz: Sizes, row: dict[str, Any]) -> tuple[LossContext, Any] | None:
    """ctx with the real tokenizers (vocabularies resized to theirs) and the id-map build times in row;
    None (row["note"] set) when the tokenizers are missing."""
    toks = load_tokenizers()
    if isinstance(toks, str):
        row["note"] = toks
        return None
    student, teacher = toks
    ctx.student_tokenizer, ctx.teacher_tokenizer = student, teacher
    ctx.vocab_student, ctx.vocab_teacher = len(student), len(teacher)
    with tempfile.TemporaryDirectory() as cache:
        ctx.cache_dir = cache
        t0 = time.perf_counter()
        build_loss(LossConfig(name="mined"), ctx)  # cold: token tables + id map, written to the cache
        row["id_map_build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_loss(LossConfig(name="mined"), ctx)  # warm: token tables + id map read from the cache
        row["id_map_cached_s"] = time.perf_counter() - t0
    ctx.cache_dir = None
    row["tokenizers"] = f"{MINED_PAIR[0]} ({len(student)}) <- {MINED_PAIR[1]} ({len(teacher)})"
    return ctx, text_rows(sz, student, teacher)


def bench_one_loss(name: str, sz: Sizes) -> dict[str, Any]:
    """Build loss `name` on synthetic inputs and time forward+backward (run in its own process)."""
    row: dict[str, Any] = {"loss": name}
    ctx = LossContext(
        d_student=sz.d_student,
        d_teacher=sz.d_teacher,
        vocab_student=sz.vocab_student,
        vocab_teacher=sz.vocab_teacher,
        same_tokenizer=False,
    )
    texts = None
    if name == "mined":
        built = _mined_context(ctx, sz, row)
        if built is None:
            return row
        ctx, texts = built
    try:
        loss = build_loss(LossConfig(name=name), ctx)  # type: ignore[arg-type]
    except (ImportError, NotImplementedError) as e:
        row["note"] = f"not available ({type(e).__name__}: {e})"
        return row
    except (ConfigError, ValueError) as e:
        row["note"] = f"skipped: {str(e)[:160]}"
        return row
    s_head = nn.Linear(ctx.d_student, ctx.vocab_student, bias=False)
    t_head = nn.Linear(ctx.d_teacher, ctx.vocab_teacher, bias=False).requires_grad_(False)
    heads: dict[str, Callable[[Tensor], Tensor]] = {
        # heads take states of any float dtype (teacher states arrive in bf16), like the trainer's
        "student_head": lambda h: s_head(h.to(s_head.weight.dtype)),
        "teacher_head": lambda h: t_head(h.to(t_head.weight.dtype)),
        "student_embed": nn.Embedding(ctx.vocab_student, ctx.d_student),
        "teacher_embed": nn.Embedding(ctx.vocab_teacher, ctx.d_teacher).requires_grad_(False),
    }
    s_layers, t_layers = loss.required_layers()
    lsz = Sizes(**{**sz.__dict__, "vocab_student": ctx.vocab_student, "vocab_teacher": ctx.vocab_teacher})
    inputs = make_loss_inputs(lsz, s_layers, t_layers, heads, texts)
    inputs.extras["student_head_weight"] = s_head.weight  # what dskd's t2s logits read (frozen W_S)
    row["tokens"] = {
        "student": int(inputs.student["main"].mask.sum()),
        "teacher": int(inputs.teacher["main"].mask.sum()),
    }
    aligned = None
    if name == "mined":
        from cot2align.losses.mined import MinED

        kd = getattr(loss, "kd", None)
        assert isinstance(kd, MinED)
        s_view, t_view = inputs.student["main"], inputs.teacher["main"]
        t0 = time.perf_counter()
        aligned = sum(
            len(kd.align_row(s_view.targets[b, :n].tolist(), t_view.targets[b, :m].tolist()))
            for b, (n, m) in enumerate(zip(s_view.lengths.tolist(), t_view.lengths.tolist()))
        )
        row["alignment_s"] = time.perf_counter() - t0  # DTW of the batch: part of every step's forward
        row["aligned_positions"] = aligned
    floor = flop_floor(name, inputs, ctx, aligned)
    if floor is not None:
        row["floor_tflop"] = floor / 1e12
    times = []
    peak_kib = 0
    for _ in range(1 + sz.loss_repeats):  # the first run warms up (fresh process: page faults)
        base = _rss_kib("VmRSS")
        exact = _reset_peak()
        before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            wall, _ = _time_once(_loss_forward_backward, loss, inputs)
        except (ImportError, NotImplementedError) as e:
            row["note"] = f"not available ({type(e).__name__}: {e})"
            break
        except Exception as e:  # a loss still being written must not stop the benchmark
            row["note"] = f"failed ({type(e).__name__}: {str(e)[:120]})"
            break
        if exact:
            peak_kib = max(peak_kib, _rss_kib("VmHWM") - base)
        else:
            peak_kib = max(peak_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_max)
        row["peak_memory"] = "VmHWM - VmRSS (peak RSS reset before the call)" if exact else "ru_maxrss growth"
        times.append(wall)
        if wall > SLOW_LOSS_MS:  # slow losses run once (no warm-up run), to keep the full run within minutes
            break
        for t in (inputs.student_logits, *[h for v in inputs.student.values() for h in v.hidden.values()]):
            t.grad = None
        loss.zero_grad()
    if times:
        row["fb_ms"] = statistics.median(times[1:] or times)
        row["runs"] = len(times)
        row["peak_rss_delta_mib"] = peak_kib / 1024
        row["parameters"] = sum(p.numel() for p in loss.parameters())
    return row


#: a loss whose first forward+backward takes longer than this is not run again
SLOW_LOSS_MS = 5_000.0
#: kd needs one shared vocabulary; the benchmark's two vocabularies differ
KD_NOTE = "not run: same vocabulary only, and this benchmark's student / teacher vocabularies differ (50k / 150k)"


def bench_losses(quick: bool, threads: int, timeout: float, gflops: float) -> list[dict[str, Any]]:
    """One fresh process per loss (clean peak memory, and a time limit for slow ones)."""
    rows: list[dict[str, Any]] = []
    for name in loss_names():
        if name == "kd":
            rows.append({"loss": name, "note": KD_NOTE})
            continue
        cmd = [sys.executable, __file__, "--one-loss", name, "--threads", str(threads)] + (
            ["--quick"] * quick
        )
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"loss": name, "note": f"timed out: over {timeout:.0f} s (--loss-timeout)"})
            continue
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            row = json.loads(lines[-1])
            row["process_s"] = time.perf_counter() - t0
            if "floor_tflop" in row and "fb_ms" in row:
                row["floor_ms"] = row["floor_tflop"] * 1e12 / (gflops * 1e9) * 1e3
                row["x_floor"] = row["fb_ms"] / row["floor_ms"]
            rows.append(row)
        else:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"loss": name, "note": f"failed: {err[:160]}"})
    return rows


# ----------------------------------------------------------------------------- report


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def _report_ot(out: dict[str, Any]) -> list[str]:
    """The OT engine and eps sweep tables."""
    eng = out["ot_engine"]
    lines = [
        f"## OT engine: {eng['problems']} problems, mean {eng['mean_n']:.0f} x {eng['mean_m']:.0f}, "
        f"eps {EPS}, {ITERS} iterations unless stopped early; float32 timings, float64 equality",
        "",
        "| method | fwd ms | fwd+bwd ms | fwd+bwd CPU ms | x loop | x POT batch | iterations | max rel diff values | max rel diff grad (vs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in eng["methods"].items():
        iters = ",".join(str(i) for i in r.get("iterations", [])) or str(ITERS)
        lines.append(
            f"| {name} | {r['fwd_ms']:.1f} | {r['fb_ms']:.1f} | {r['fb_cpu_ms']:.1f} | {r['speedup_vs_loop']:.2f} | "
            f"{r['speedup_vs_pot_batch']:.2f} | {iters} | {r['max_rel_diff_values']:.1e} | "
            f"{r['max_rel_diff_grad']:.1e} ({r['grad_compared_with']}) |"
        )
    lines += [
        "",
        "## eps sweep (ours, auto log-domain, 100 iterations)",
        "",
        "| eps | mean <P,C> | <P,C> / mean C | H(P) / log(nm) | max P * nm | iters to 1e-6 | float32 input runs | float32 vs float64 | fwd+bwd ms (f32) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["eps_sweep"]:
        lines.append(
            f"| {r['epsilon']} | {_fmt(r['mean_value'], 5)} | {_fmt(r['value_over_product_plan'], 5)} | "
            f"{_fmt(r['plan_entropy_normalised'], 4)} | {_fmt(r['plan_max_entry_times_nm'])} | "
            f"{'' if r['tol_reached'] else '> '}{r['iterations_to_tol_1e-6']} | {r['float32_input_path']} | "
            f"{r['max_rel_diff_float32_vs_float64']:.1e} | {r['fb_ms_float32']:.1f} |"
        )
    return lines


def _report_e2e(e2e: dict[str, Any]) -> list[str]:
    """The OT term end to end table."""
    lines = [
        "",
        f"## OT term end to end: {e2e['problems']} problems, mean {e2e['mean_n']:.0f} x {e2e['mean_m']:.0f}, "
        f"d = {e2e['d']}; states in, attention cost inside, forward + backward (float32, best of interleaved rounds)",
        "",
        "end to end = states X, Y -> cost -> Sinkhorn -> values, and the backward to X and Y; solver only = the "
        "same solver on the costs computed beforehand (leaves); floor = the cost's products "
        f"({e2e['cost_gflop']:.1f} GFLOP fwd+bwd) + the solver's forward matrix-vector products, at the rate of the "
        "cost's own product measured in the same run; equality: float64 against the reference loop.",
        "",
        "| setting | threads | method | iterations | end to end ms | x reference | floor ms | x floor | "
        "CPU ms | x reference (CPU) | x floor (CPU) | solver only ms | H(P)/log(nm) | rel diff values | "
        "rel diff grad | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for st in e2e["settings"]:
        for key in sorted(k for k in st if k.startswith("threads_")):
            th = st[key]
            for name, eq in st["methods"].items():
                r = th[name]
                iters = ",".join(str(i) for i in eq.get("iterations", [st["iterations"]]))
                solver = "" if r["solver_only_fb_ms"] is None else f"{r['solver_only_fb_ms']:.0f}"
                ent = f"{eq['plan_entropy_normalised']:.3f}" if "plan_entropy_normalised" in eq else ""
                load = f"{min(th['load_average']):.1f}-{max(th['load_average']):.1f}"
                grad = "n/a (envelope)" if eq["max_rel_diff_grad"] is None else f"{eq['max_rel_diff_grad']:.1e}"
                lines.append(
                    f"| {st['label']} | {th['threads']} | {name} | {iters} | {r['fb_ms']:.0f} | "
                    f"{r['x_reference']:.2f} | {r['floor_ms']:.0f} | {r['x_floor']:.2f} | {r['fb_cpu_ms']:.0f} | "
                    f"{r['x_reference_cpu']:.2f} | {r['x_floor_cpu']:.2f} | {solver} | {ent} | "
                    f"{eq['max_rel_diff_values']:.1e} | {grad} | {load} |"
                )
        rate = ", ".join(
            f"{st[k]['cost_gflops']:.0f} GFLOP/s wall, {st[k]['cost_gflops_cpu']:.0f} per CPU second on "
            f"{st[k]['threads']} thread(s)"
            for k in sorted(k for k in st if k.startswith("threads_"))
        )
        lines.append(f"| {st['label']}: cost product rate | {rate} |||||||||||||||")
    return lines


def report(out: dict[str, Any]) -> str:
    """Markdown tables of every section that ran."""
    lines = _report_ot(out) if out["ot_engine"] else ["(OT engine and eps sweep skipped: --skip-ot / --only-e2e)"]
    if out.get("ot_end_to_end"):
        lines += _report_e2e(out["ot_end_to_end"])
    if not out["losses"]:
        return "\n".join(lines)
    gf = out["machine"]["matmul_gflops"]
    lines += [
        "",
        "## all losses (forward+backward of the loss only; student logits are a leaf)",
        "",
        f"floor = the loss's unavoidable vocabulary-sized products (`flop_floor`) at this process's measured "
        f"fp32 matmul rate, {gf:.0f} GFLOP/s ([256 x {out['sizes']['d_teacher']}] x "
        f"[{out['sizes']['d_teacher']} x {out['sizes']['vocab_teacher']}]).",
        "",
        "| loss | fwd+bwd s | floor TFLOP | floor s | x floor | peak RSS delta MiB | loss parameters | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in out["losses"]:
        note = r.get("note", "")
        if r["loss"] == "mined" and "fb_ms" in r:
            note = (
                f"{r['tokenizers']}, real text ({r['tokens']['student']} / {r['tokens']['teacher']} tokens, "
                f"{r['aligned_positions']} aligned); DTW alignment {r['alignment_s']:.2f} s (inside the step); "
                f"id map build {r['id_map_build_s']:.1f} s cold, {r['id_map_cached_s']:.1f} s from its cache (once, "
                f"not in the step)"
            )
        if "fb_ms" in r:
            floor = r.get("floor_ms")
            lines.append(
                f"| {r['loss']} | {r['fb_ms'] / 1e3:.2f} | "
                + (f"{r['floor_tflop']:.2f} | {floor / 1e3:.1f} | {r['x_floor']:.2f}" if floor else "- | - | -")
                + f" | {r['peak_rss_delta_mib']:.0f} | {r['parameters']} | {note} |"
            )
        else:
            lines.append(f"| {r['loss']} | - | - | - | - | - | - | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 1 min")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0 = torch default); 1 by default: with other jobs on a 2-core "
        "machine, 2 OpenMP threads stall each other and a full run takes over 15 min",
    )
    parser.add_argument(
        "--loss-threads",
        type=int,
        default=2,
        help="torch intra-op threads of each 'all losses' process (default 2: large matmuls and "
        "vocabulary-wide element-wise ops, which scale with threads, unlike the OT engine's small ops)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "losses.json"))
    parser.add_argument("--skip-losses", action="store_true", help="only the OT engine sections")
    parser.add_argument(
        "--e2e-threads", default="1,2", help="thread counts of the OT end-to-end section (comma-separated)"
    )
    parser.add_argument("--e2e-repeats", type=int, default=3, help="timed rounds of the OT end-to-end section")
    parser.add_argument("--only-e2e", action="store_true", help="only the OT end-to-end section")
    parser.add_argument("--skip-ot", action="store_true", help="only the 'all losses' section")
    parser.add_argument("--loss-timeout", type=float, default=300.0, help="seconds per loss in 'all losses'")
    parser.add_argument("--one-loss", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sz = QUICK if args.quick else FULL
    if args.one_loss:
        print(json.dumps(bench_one_loss(args.one_loss, sz)))
        return
    start = time.perf_counter()
    out: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "pot": ot.__version__,
            "threads": torch.get_num_threads(),
            "load_average_start": os.getloadavg(),
        },
        "sizes": sz.__dict__,
    }
    sections: dict[str, float] = {}
    t0 = time.perf_counter()
    out["ot_engine"] = {} if args.skip_ot or args.only_e2e else bench_engine(sz)
    out["eps_sweep"] = [] if args.skip_ot or args.only_e2e else bench_eps(sz)
    sections["ot_engine_and_eps_sweep"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    threads = [int(t) for t in args.e2e_threads.split(",") if t]
    out["ot_end_to_end"] = {} if args.skip_ot else bench_end_to_end(sz, threads, args.e2e_repeats)
    sections["ot_end_to_end"] = time.perf_counter() - t0
    if args.only_e2e:
        args.skip_losses = True
    out["losses"] = []
    if not args.skip_losses:
        t0 = time.perf_counter()
        if args.loss_threads:
            torch.set_num_threads(args.loss_threads)
        out["machine"]["loss_threads"] = torch.get_num_threads()
        out["machine"]["matmul_gflops"] = matmul_gflops(sz)
        out["losses"] = bench_losses(
            args.quick, out["machine"]["loss_threads"], args.loss_timeout, out["machine"]["matmul_gflops"]
        )
        sections["losses"] = time.perf_counter() - t0
    out["section_seconds"] = sections
    out["machine"]["load_average_end"] = os.getloadavg()
    out["seconds"] = time.perf_counter() - start
    text = report(out)
    print(text)
    print(
        f"\n{out['machine']['threads']} thread(s) for the OT sections, {out['machine'].get('loss_threads', '-')} per loss process; load average {out['machine']['load_average_start']} -> "
        f"{out['machine']['load_average_end']}; {out['seconds']:.0f} s"
    )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
