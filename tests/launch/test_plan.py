"""Tests of the cluster planner: parameter counts, the memory / throughput model re-derived by hand, the search."""

from __future__ import annotations

import math

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from cot2align.config import Config
from cot2align.configbase import ConfigError
from cot2align.launch.layout import workload_for
from cot2align.lora import LoraConfig, apply_lora
from cot2align.modelspec import ModelSpec, load_model_spec, model_spec_from_hf_config
from cot2align.plan import (
    ClusterSpec,
    Plan,
    WorkloadSpec,
    cached_layout,
    evaluate,
    lora_params,
    main,
    pipeline_crosses_nodes,
    plan,
    plan_from_files,
    student_memory,
    timing,
)

GIB = 2**30

PUBLISHED = {
    "llama-3-70b": 70.6e9,
    "llama-3.2-1b": 1.24e9,
    "gpt2-120m": 124e6,
    "gpt2-1.5b": 1.56e9,
    "mistral-7b": 7.24e9,
    "tinyllama-1.1b": 1.1e9,
    "qwen2.5-7b-instruct": 7.6e9,
    "qwen1.5-1.8b": 1.84e9,
}


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_published(name: str) -> None:
    assert load_model_spec(name).total_params == pytest.approx(PUBLISHED[name], rel=0.02)


def test_exact_counts_of_well_known_models() -> None:
    # HF's own model.num_parameters() values
    assert load_model_spec("gpt2-120m").total_params == 124_439_808
    assert load_model_spec("gpt2-1.5b").total_params == 1_557_611_200
    # Llama-3-70B by hand: 80 * (2*8192^2 + 2*8192*1024 + 3*8192*28672 + 2*8192) + 2*128256*8192 + 8192
    layer = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert load_model_spec("llama-3-70b").total_params == 80 * layer + 2 * 128256 * 8192 + 8192


def test_config_field_variants() -> None:
    gpt2 = model_spec_from_hf_config(
        {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100}
    )
    assert (gpt2.num_kv_heads, gpt2.ffn_size, gpt2.tied_embeddings, gpt2.learned_positions) == (
        4,
        256,
        True,
        1024,
    )
    # 12 h^2 + 13 h per layer, wte + wpe + ln_f
    assert gpt2.total_params == 2 * (12 * 64**2 + 13 * 64) + 100 * 64 + 1024 * 64 + 2 * 64

    base = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 100,
    }
    llama = model_spec_from_hf_config({**base, "model_type": "llama"})
    assert llama.num_kv_heads == 4 and not llama.tied_embeddings  # MHA default, Llama default untied
    assert llama.total_params == 2 * (4 * 64**2 + 3 * 64 * 128 + 2 * 64) + 2 * 100 * 64 + 64
    qwen2 = model_spec_from_hf_config({**base, "model_type": "qwen2", "num_key_value_heads": 2})
    kv = 2 * 16
    assert (
        qwen2.total_params
        == 2 * (2 * 64**2 + 2 * 64 * kv + (64 + 2 * kv) + 3 * 64 * 128 + 2 * 64) + 2 * 100 * 64 + 64
    )
    gemma = model_spec_from_hf_config(
        {**base, "model_type": "gemma", "head_dim": 32, "num_key_value_heads": 1}
    )
    assert gemma.tied_embeddings and gemma.q_dim == 128 and gemma.kv_dim == 32
    assert gemma.total_params == 2 * (2 * 64 * 128 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 100 * 64 + 64
    gemma2 = model_spec_from_hf_config({**base, "model_type": "gemma2", "tie_word_embeddings": False})
    assert not gemma2.tied_embeddings and gemma2.layer_norm_params == 4 * 64
    with pytest.raises(ConfigError, match="hidden_size"):
        model_spec_from_hf_config({"model_type": "llama", "num_hidden_layers": 2}, name="broken")


# ----------------------------------------------------------------------------- 70B -> 1B on 8 x 8 x 80 GB

CLUSTER_64 = ClusterSpec(nodes=8, gpus_per_node=8, gpu_memory_gib=80.0)
WORKLOAD = WorkloadSpec(teacher_seq_len=512, student_seq_len=512, micro_batch_size=4, dtype="bf16")

# The architectures, written out again (not read from the library).
T_L, T_H, T_A, T_KV, T_HD, T_F, T_V = 80, 8192, 64, 8, 128, 28672, 128256
S_L, S_H, S_A, S_KV, S_HD, S_F, S_V = 16, 2048, 32, 8, 64, 8192, 128256
T_LAYER = 2 * T_H * T_A * T_HD + 2 * T_H * T_KV * T_HD + 3 * T_H * T_F + 2 * T_H
S_LAYER = 2 * S_H * S_A * S_HD + 2 * S_H * S_KV * S_HD + 3 * S_H * S_F + 2 * S_H
S_TOTAL = S_L * S_LAYER + S_V * S_H + S_H  # tied head
B = 2
ROWS = 4 * 2  # micro-batch x formats (cot, std)
TOK = ROWS * 512


@pytest.fixture(scope="module")
def plan70b() -> Plan:
    return plan_from_files("llama-3-70b", "llama-3.2-1b", CLUSTER_64, WORKLOAD, {})


def _node(rank: int) -> int:
    return rank // 8


def test_70b_layout_is_whole_and_within_nodes(plan70b: Plan) -> None:
    p = plan70b
    assert p.replicas * p.tp * p.pp + p.dp == 64 == p.world_size
    assert T_A % p.tp == 0 and T_KV % p.tp == 0 and T_L % p.pp == 0
    for j in range(p.replicas):  # every TP group sits in one node
        for k in range(p.pp):
            first = j * p.tp * p.pp + k * p.tp
            assert {_node(first + i) for i in range(p.tp)} == {_node(first)}
    assert p.dp >= p.replicas - 1  # at most one replica left without a student


def test_70b_fits_with_headroom(plan70b: Plan) -> None:
    for mem in (plan70b.teacher_memory, plan70b.student_memory):
        assert mem.headroom == pytest.approx(1 - sum(mem.components.values()) / 80)
        assert mem.headroom >= 0.10
        assert mem.total_gib <= 0.9 * 80


def test_served_buffers_grow_with_students_per_replica() -> None:
    t, s = load_model_spec("llama-3-70b"), load_model_spec("llama-3.2-1b")
    for replicas, dp, k in [(7, 8, 2), (6, 16, 3), (4, 32, 8)]:
        p = evaluate(t, s, CLUSTER_64, WORKLOAD, 8, 1, replicas, dp)
        assert p.students_per_replica == k
        assert p.teacher_memory.components["served buffers"] * GIB == k * 3 * 2 * TOK * T_H * B


def test_70b_teacher_memory_by_hand(plan70b: Plan) -> None:
    tp, pp = plan70b.tp, plan70b.pp
    k = math.ceil(plan70b.dp / plan70b.replicas)
    body = (T_L // pp) * T_LAYER / tp
    first = body + T_V * T_H / tp  # vocab-parallel embedding
    last = body + T_H + T_V * T_H / tp  # final norm (replicated) + untied head (vocab-parallel)
    stages = [body + T_V * T_H / tp + T_H + T_V * T_H / tp] if pp == 1 else [first, last]
    weights = max(stages) * B / GIB
    act = TOK * (4 * T_H + T_A * T_HD + 2 * T_KV * T_HD + 3 * T_F) / tp + (2 * TOK * T_H if pp > 1 else 0)
    served = k * (2 + 1) * 2 * TOK * T_H * B  # k students x (prefetch 2 + 1) x 2 served layers
    expected = {
        "weights": weights,
        "activations": act * B / GIB,
        "served buffers": served / GIB,
        "reserved": 3.0,
    }
    assert plan70b.teacher_memory.components == pytest.approx(expected, rel=1e-12)
    # every stage, not only the heaviest, fits with 10% headroom
    for params in stages:
        assert params * B / GIB + (act * B + served) / GIB + 3.0 <= 72.0


def test_70b_student_memory_by_hand(plan70b: Plan) -> None:
    dp = plan70b.dp
    psi = S_TOTAL + 2 * (S_H * T_H + T_H)  # + two projectors 2048 -> 8192
    expected = {
        "weights": 2 * psi,  # ZeRO-2: weights replicated
        "gradients": 2 * psi / dp,
        "optimizer": 12 * psi / dp,
        "teacher head": T_V * T_H * 2,
        "activations": 2 * TOK * S_L * (4 * S_H + 2 * S_A * S_HD + 2 * S_KV * S_HD + 4 * S_F),
        "logits": TOK * S_V * 10 + TOK * T_V * 6,
        "received states": 3 * 2 * TOK * T_H * 2,
        "ot": 3 * 2 * 4 * 512 * 512 * 12,
        "zero buffers": 2 * 500_000_000 * 2 if dp > 1 else 0,
    }
    got = plan70b.student_memory.components
    assert got.pop("reserved") == 3.0
    assert got == pytest.approx({k: v / GIB for k, v in expected.items()}, rel=1e-12)


def _hand_throughput(p: Plan) -> tuple[float, float, float]:
    """(examples/s, teacher capacity tokens/s, student capacity tokens/s) from the documented formulas."""
    F = 312e12 * 0.4
    intra, inter = 300e9, 25e9
    tp, pp, R, dp = p.tp, p.pp, p.replicas, p.dp
    act = TOK * T_H * B
    t_comp = 2 * T_L * T_LAYER * TOK / (tp * pp * F)
    t_tp = (T_L / pp) * 2 * 2 * (tp - 1) / tp * act / intra
    hops = [
        (j * tp * pp + k * tp + i, j * tp * pp + (k + 1) * tp + i)
        for j in range(R)
        for k in range(pp - 1)
        for i in range(tp)
    ]
    crosses = any(_node(a) != _node(b) for a, b in hops)
    t_pp = act / (inter if crosses else intra) if pp > 1 else 0.0
    t_stage = t_comp + t_tp + t_pp
    t_wire = 2 * act / inter
    psi = S_TOTAL + 2 * (S_H * T_H + T_H)
    c_s = S_L * S_LAYER + S_V * S_H + 2 * (S_H * T_H + T_H)
    t_s = (6 * c_s * TOK + 2 * T_V * T_H * TOK) / F
    students = range(R * tp * pp, 64)
    bw_dp = intra if len({_node(r) for r in students}) == 1 else inter
    t_s += 2 * psi * B * (dp - 1) / dp / bw_dp / 2 if dp > 1 else 0.0  # grad_accum 2
    k = math.ceil(dp / R)
    rho_t = min(1 / (k * t_stage), 3 / (pp * t_stage), 1 / (k * t_wire))
    rho = min(1 / t_s, rho_t)
    return dp * rho * 4, R * min(1 / t_stage, 1 / t_wire) * TOK, dp / t_s * TOK


def test_70b_throughput_by_hand(plan70b: Plan) -> None:
    ex, t_cap, s_cap = _hand_throughput(plan70b)
    assert plan70b.examples_per_s == pytest.approx(ex, rel=1e-9)
    assert plan70b.teacher_capacity_tokens_per_s == pytest.approx(t_cap, rel=1e-9)
    assert plan70b.student_capacity_tokens_per_s == pytest.approx(s_cap, rel=1e-9)
    # both roles move the same examples; the expected tokens are examples x formats x seq
    assert plan70b.teacher_tokens_per_s == pytest.approx(ex * 2 * 512, rel=1e-9)
    assert plan70b.student_tokens_per_s == pytest.approx(ex * 2 * 512, rel=1e-9)
    idle_t = 1 - plan70b.teacher_tokens_per_s / t_cap
    idle_s = 1 - plan70b.student_tokens_per_s / s_cap
    assert (plan70b.teacher_idle, plan70b.student_idle) == pytest.approx((idle_t, idle_s), abs=1e-9)
    assert plan70b.idle_fraction == pytest.approx(
        idle_s if plan70b.bottleneck == "teacher" else idle_t, abs=1e-12
    )


def test_70b_throughput_is_balanced_as_gpu_counts_allow(plan70b: Plan) -> None:
    # the 70B teacher needs ~14x the FLOPs of the 1B student per example: most GPUs go to it
    assert plan70b.teacher_gpus >= 48
    # the slower side (the bottleneck) is kept busy
    slow_idle = plan70b.teacher_idle if plan70b.bottleneck == "teacher" else plan70b.student_idle
    assert slow_idle < 0.10
    # no other layout that fits and gives every replica a student moves more examples/s
    assert plan70b.dp >= plan70b.replicas
    t, s = plan70b.teacher, plan70b.student
    for tp in (1, 2, 4, 8):
        for pp in [d for d in range(1, 81) if 80 % d == 0 and tp * d < 64]:
            for r in range(1, (63 // (tp * pp)) + 1):
                cand = evaluate(t, s, CLUSTER_64, WORKLOAD, tp, pp, r, 64 - r * tp * pp)
                if cand.fits and cand.dp >= r:
                    assert cand.examples_per_s <= plan70b.examples_per_s * (1 + 1e-9)


def test_70b_markdown_table(plan70b: Plan) -> None:
    md = plan70b.to_markdown()
    p = plan70b
    assert f"| teacher | 0-{p.teacher_gpus - 1} | {p.replicas} replica(s) x (tp {p.tp} x pp {p.pp}) |" in md
    assert f"| student | {p.teacher_gpus}-63 | dp {p.dp}, ZeRO-2" in md
    assert (
        f"| weights | {p.teacher_memory.components['weights']:.2f} | {p.student_memory.components['weights']:.2f} |"
        in md
    )
    assert f"{p.teacher_tokens_per_s:,.0f}" in md and f"{p.idle_fraction:.1%}" in md


# ----------------------------------------------------------------------------- the paper's pairs on 4 GPUs

PAPER_PAIRS = [
    ("qwen1.5-1.8b", "gpt2-120m"),
    ("mistral-7b", "tinyllama-1.1b"),
    ("qwen2.5-7b-instruct", "gpt2-1.5b"),
]


@pytest.mark.parametrize(("teacher", "student"), PAPER_PAIRS)
def test_paper_pairs_on_four_gpus(teacher: str, student: str) -> None:
    cluster = ClusterSpec(nodes=1, gpus_per_node=4, gpu_memory_gib=80.0)
    p = plan_from_files(teacher, student, cluster, WorkloadSpec(micro_batch_size=4), {})
    assert p.world_size == 4 and p.replicas * p.tp * p.pp + p.dp == 4
    assert p.fits and p.teacher_memory.headroom >= 0.1 and p.student_memory.headroom >= 0.1
    # each teacher needs more FLOPs per example than its student but less than 3x: two replicas, two students
    assert (p.tp, p.pp, p.replicas, p.dp) == (1, 1, 2, 2)
    assert p.bottleneck == "teacher" and 0 < p.idle_fraction < 0.6
    assert p.examples_per_s > 0 and not [w for w in p.warnings if "serve nobody" in w]


# ----------------------------------------------------------------------------- explicit sizes


def test_explicit_sizes_are_respected() -> None:
    p = plan_from_files(
        "llama-3-70b", "llama-3.2-1b", CLUSTER_64, WORKLOAD, {"tp": 8, "pp": 1, "replicas": 7, "dp": 8}
    )
    assert (p.tp, p.pp, p.replicas, p.dp) == (8, 1, 7, 8)
    p = plan_from_files("llama-3-70b", "llama-3.2-1b", CLUSTER_64, WORKLOAD, {"dp": 16})
    assert p.dp == 16 and p.replicas * p.tp * p.pp == 48
    p = plan_from_files("llama-3-70b", "llama-3.2-1b", CLUSTER_64, WORKLOAD, {"tp": 4, "pp": None})
    assert p.tp == 4


@pytest.mark.parametrize(
    ("fixed", "pieces"),
    [
        ({"tp": 3}, ["teacher.tp", "tp=3", "gpus_per_node=8", "heads (64)", "query groups (8)"]),
        ({"tp": 16}, ["teacher.tp", "tp=16", "gpus_per_node=8"]),
        ({"pp": 3}, ["teacher.pp", "pp=3", "80 layers"]),
        (
            {"tp": 8, "pp": 1, "replicas": 7, "dp": 4},
            ["teacher.replicas", "student.dp", "= 60 GPUs", "!= 64"],
        ),
        ({"tp": 8, "pp": 8, "replicas": 2}, ["teacher.tp", "128 teacher", "64"]),
        ({"replicas": 0}, ["teacher.replicas", "must be >= 1"]),
    ],
)
def test_impossible_explicit_sizes_name_key_and_numbers(fixed: dict[str, int], pieces: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        plan_from_files("llama-3-70b", "llama-3.2-1b", CLUSTER_64, WORKLOAD, fixed)
    for piece in pieces:
        assert piece in str(e.value)


def test_too_little_memory_for_fixed_teacher_shard() -> None:
    with pytest.raises(ConfigError) as e:
        plan_from_files("llama-3-70b", "llama-3.2-1b", CLUSTER_64, WORKLOAD, {"tp": 1, "pp": 1})
    msg = str(e.value)
    weights = (80 * T_LAYER + 2 * T_V * T_H + T_H) * 2 / GIB  # the whole 70B in bf16 on one GPU
    assert "teacher.tp=1" in msg and "teacher.pp=1" in msg
    assert f"weights {weights:.2f}" in msg and "72.00 GiB usable" in msg


def test_too_little_memory_for_students() -> None:
    small = ClusterSpec(nodes=1, gpus_per_node=4, gpu_memory_gib=24.0)
    zero0 = WorkloadSpec(student_zero_stage=0)
    with pytest.raises(ConfigError) as e:
        plan_from_files("mistral-7b", "tinyllama-1.1b", small, zero0, {"dp": 2})
    msg = str(e.value)
    assert (
        "student.dp=2" in msg
        and "a student rank needs" in msg
        and "ZeRO-0" in msg
        and "21.60 GiB usable" in msg
    )
    # ZeRO-3 over the same two ranks fits
    p = plan_from_files("mistral-7b", "tinyllama-1.1b", small, WorkloadSpec(student_zero_stage=3), {"dp": 2})
    assert p.dp == 2 and p.fits


def test_auto_plan_without_fit_names_gpu_memory() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.gpu_memory_gib: the teacher shard needs at least"):
        plan_from_files(
            "llama-3-70b", "llama-3.2-1b", ClusterSpec(nodes=1, gpus_per_node=2, gpu_memory_gib=40), WORKLOAD
        )


@pytest.mark.parametrize(("gpn", "allowed"), [(4, {1, 2, 4}), (6, {1, 2}), (2, {1, 2})])
def test_tp_never_crosses_a_node(gpn: int, allowed: set[int]) -> None:
    cluster = ClusterSpec(nodes=48 // gpn, gpus_per_node=gpn, gpu_memory_gib=80.0)
    p = plan_from_files("llama-3-70b", "llama-3.2-1b", cluster, WORKLOAD)
    assert p.tp in allowed and gpn % p.tp == 0
    for j in range(p.replicas):
        for k in range(p.pp):
            first = j * p.tp * p.pp + k * p.tp
            assert (first + p.tp - 1) // gpn == first // gpn
    with pytest.raises(ConfigError, match=rf"teacher\.tp: tp=8 must divide gpus_per_node={gpn}"):
        plan_from_files("llama-3-70b", "llama-3.2-1b", cluster, WORKLOAD, {"tp": 8})


# ----------------------------------------------------------------------------- pieces of the model


def test_pipeline_crossing() -> None:
    assert not pipeline_crosses_nodes(tp=2, pp=2, replicas=16, gpus_per_node=8)  # 4-GPU replicas, aligned
    assert pipeline_crosses_nodes(tp=8, pp=2, replicas=1, gpus_per_node=8)  # stage 1 on the next node
    assert pipeline_crosses_nodes(tp=2, pp=2, replicas=3, gpus_per_node=6)  # replica 1: ranks 4,5 | 6,7
    assert not pipeline_crosses_nodes(tp=2, pp=2, replicas=1, gpus_per_node=6)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_partitioning(stage: int) -> None:
    s = load_model_spec("tinyllama-1.1b")
    t = load_model_spec("mistral-7b")
    wl = WorkloadSpec(student_zero_stage=stage, projectors=0)  # type: ignore[arg-type]
    m = student_memory(s, t, ClusterSpec(), wl, dp=4).components
    psi = s.total_params
    div = [1 if stage < x else 4 for x in (3, 2, 1)]  # weights sharded at 3, grads at >= 2, optimizer at >= 1
    assert m["weights"] * GIB == pytest.approx(2 * psi / div[0])
    assert m["gradients"] * GIB == pytest.approx(2 * psi / div[1])
    assert m["optimizer"] * GIB == pytest.approx(12 * psi / div[2])
    assert (m["weights"] + m["gradients"] + m["optimizer"]) * GIB == pytest.approx(
        [16 * psi, 4 * psi + 12 * psi / 4, 2 * psi + 14 * psi / 4, 16 * psi / 4][stage]
    )


def test_attention_scores_without_flash() -> None:
    t, s = load_model_spec("llama-3-70b"), load_model_spec("llama-3.2-1b")
    flash = evaluate(t, s, CLUSTER_64, WORKLOAD, 8, 1, 7, 8)
    eager = evaluate(t, s, CLUSTER_64, WorkloadSpec(micro_batch_size=4, flash_attention=False), 8, 1, 7, 8)
    extra_t = 2 * ROWS * (T_A / 8) * 512**2 * B / GIB
    extra_s = S_L * 2 * ROWS * S_A * 512**2 * B / GIB
    assert eager.teacher_memory.components["activations"] - flash.teacher_memory.components[
        "activations"
    ] == (pytest.approx(extra_t))
    assert eager.student_memory.components["activations"] - flash.student_memory.components[
        "activations"
    ] == (pytest.approx(extra_s))


def test_tied_head_is_copied_to_last_stage_only_with_pipeline() -> None:
    t = load_model_spec("llama-3.2-1b")  # tied
    s = load_model_spec("gpt2-120m")
    cluster = ClusterSpec(nodes=1, gpus_per_node=8)
    one = evaluate(t, s, cluster, WORKLOAD, 1, 1, 1, 7).teacher_memory.components["weights"] * GIB / 2
    two = evaluate(t, s, cluster, WORKLOAD, 1, 2, 1, 6).teacher_memory.components["weights"] * GIB / 2
    assert one == t.total_params
    assert two == max(
        8 * t.layer_params + t.embedding_params, 8 * t.layer_params + t.hidden_size + t.embedding_params
    )


def test_spec_validation_names_keys() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.mfu"):
        ClusterSpec(mfu=0.0).validate("cluster")
    with pytest.raises(ConfigError, match=r"workload\.micro_batch_size"):
        WorkloadSpec(micro_batch_size=0).validate("workload")
    with pytest.raises(ConfigError, match=r"unknown config key 'fixed\.tpp'"):
        tiny = ModelSpec("t", "llama", 2, 8, 2, 2, 4, 16, 10, False, True)
        plan(
            tiny,
            load_model_spec("gpt2-120m"),
            ClusterSpec(nodes=1, gpus_per_node=2),
            WorkloadSpec(),
            {"tpp": 2},
        )


# ----------------------------------------------------------------------------- CLI


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "--teacher",
                "mistral-7b",
                "--student",
                "tinyllama-1.1b",
                "cluster.nodes=1",
                "cluster.gpus_per_node=4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| teacher | 0-1 | 2 replica(s) x (tp 1 x pp 1) |" in out and "| student | 2-3 | dp 2" in out
    assert main(["cluster.nodes=8", "fixed.tp=3"]) == 2
    err = capsys.readouterr().err
    assert "fixed.tp: tp=3" in err


def test_cached_layout_by_hand(plan70b: Plan, capsys: pytest.CaptureFixture[str]) -> None:
    """The cached run puts a student on every GPU: the same student compute per micro-batch, the DP
    exchange rescaled from dp to 64 ranks ((n - 1) / n, same inter-node bandwidth), and the disk of
    bf16 states of the served layers at every teacher token."""
    p = plan70b
    c = cached_layout(p)
    assert c.dp == 64
    t_dp = p.timing.student_dp_comm * (63 / 64) / ((p.dp - 1) / p.dp)
    b = p.workload.micro_batch_size
    assert c.examples_per_s == pytest.approx(64 * b / (p.timing.student_compute + t_dp), rel=1e-9)
    assert c.examples_per_s > 4 * p.examples_per_s  # 64 students instead of 14 waiting on the teacher
    assert c.bytes_per_token == p.workload.served_layers * 8192 * 2
    assert c.bytes_per_token_int8 == p.workload.served_layers * (8192 + 4)
    assert c.bytes_per_example == c.bytes_per_token * p.workload.formats * p.workload.teacher_seq_len
    assert main(["--teacher", "llama-3-70b", "--student", "llama-3.2-1b", "cluster.nodes=8"]) == 0
    out = capsys.readouterr().out
    assert "## Cached run (teacher.cache.mode=read): every GPU a student" in out and "| dp 64, no teacher ranks |" in out


# ----------------------------------------------------------------------------- LoRA students

LORA_MODELS = {
    "llama": ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 80, "vocab_size": 64},
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": ({"model_type": "gpt2", "n_layer": 2, "n_embd": 48, "n_head": 4, "n_inner": 80, "vocab_size": 64,
              "n_positions": 32}, ["c_attn", "c_proj", "c_fc"]),
}


@pytest.mark.parametrize("arch", sorted(LORA_MODELS))
def test_lora_parameters_match_peft(arch: str) -> None:
    """The planner's adapter count equals what peft trains on the same model (each target alone, all)."""
    hf, targets = LORA_MODELS[arch]
    spec = model_spec_from_hf_config(hf)
    for chosen in [[t] for t in targets] + [targets]:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
        lora = apply_lora(model, LoraConfig(enabled=True, r=4, target_modules=chosen), "student_lora")
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        assert lora_params(spec, 4, chosen) == trainable, chosen


def test_lora_student_memory_and_flops() -> None:
    """A LoRA student: weights hold the frozen base too; gradients, optimizer, ZeRO buckets, DP traffic
    and weight-gradient FLOPs only the adapters (and projectors)."""
    s, t = load_model_spec("tinyllama-1.1b"), load_model_spec("mistral-7b")
    full = WorkloadSpec(projectors=0)
    lora = WorkloadSpec(projectors=0, student_lora_rank=16, student_lora_targets=["q_proj", "v_proj"])
    a = lora_params(s, 16, ["q_proj", "v_proj"])
    assert a == s.num_layers * 16 * ((s.hidden_size + s.q_dim) + (s.hidden_size + s.kv_dim))
    m = student_memory(s, t, ClusterSpec(), lora, dp=4).components
    assert m["weights"] * GIB == pytest.approx(2 * (s.total_params + a))
    assert m["gradients"] * GIB == pytest.approx(2 * a / 4)  # ZeRO-2
    assert m["optimizer"] * GIB == pytest.approx(12 * a / 4)
    assert m["zero buffers"] * GIB == pytest.approx(2 * 2 * a)
    cluster = ClusterSpec(nodes=1, gpus_per_node=8)
    f, l_ = timing(t, s, cluster, full, 1, 1, 1, 7), timing(t, s, cluster, lora, 1, 1, 1, 7)
    assert l_.student_dp_comm == pytest.approx(f.student_dp_comm * a / s.total_params)
    c_s = s.num_layers * s.layer_params + s.vocab_size * s.hidden_size
    head = full.teacher_head_flops_per_param * t.vocab_size * t.hidden_size * full.rows * full.teacher_seq_len
    tokens = full.rows * full.student_seq_len
    assert (f.student_compute - l_.student_compute) * cluster.flops_per_gpu == pytest.approx((2 * c_s - 2 * a) * tokens)
    assert f.student_compute * cluster.flops_per_gpu == pytest.approx(6 * c_s * tokens + head)


def test_lora_student_workload_from_config() -> None:
    cfg = Config().merged({"student_lora": {"enabled": True, "r": 4, "target_modules": ["c_attn"]}})
    wl = workload_for(cfg)
    assert (wl.student_lora_rank, wl.student_lora_targets) == (4, ["c_attn"])
    assert workload_for(Config()).student_lora_rank == 0
    with pytest.raises(ConfigError, match=r"workload\.student_lora_targets.*\['wq'\]"):
        WorkloadSpec(student_lora_rank=4, student_lora_targets=["wq"]).validate("workload")
