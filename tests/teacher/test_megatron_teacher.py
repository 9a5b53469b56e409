"""megatron-core teacher vs the HF model: logits and served hidden states, TP x PP on CPU/gloo.

One 5-rank gloo world runs every case: the teacher of each case occupies the first
TP*PP ranks (a fresh Topology per case) and the remaining ranks are "students" that
only take part in group creation -- nothing initialises megatron world-wide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from dist import run_distributed

from cot2align.teacher.hf_to_megatron import (
    CheckpointReader,
    LlamaFamilyConfig,
    megatron_shard_state,
    padded_vocab_size,
)
from cot2align.teacher.megatron_model import megatron_attention_mask

WORLD = 5
VOCAB = 250  # not a multiple of 128 * TP: exercises the zero pad rows
LAYERS = 4
SERVED = [0, 2, 3, -1]  # embedding output, a middle layer on each stage, final-norm output
DIMS: dict[str, Any] = dict(
    hidden_size=64,
    num_attention_heads=8,
    num_key_value_heads=4,  # 2 query groups per TP rank at TP2: catches wrong QKV grouping
    intermediate_size=128,
    vocab_size=VOCAB,
    num_hidden_layers=LAYERS,
)
# name -> (HF architecture prefix, extra config, max_shard_size or None)
CHECKPOINTS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "llama": ("Llama", {"tie_word_embeddings": False}, None),
    "llama_tied_sharded": ("Llama", {"tie_word_embeddings": True}, "40KB"),
    "llama_bias": ("Llama", {"attention_bias": True, "mlp_bias": True}, None),
    "qwen2": ("Qwen2", {"tie_word_embeddings": False}, None),
}
# (case id, checkpoint, tp, pp, dtype)
CASES: list[tuple[str, str, int, int, torch.dtype]] = [
    ("llama-1x1", "llama", 1, 1, torch.float32),
    ("llama-2x1", "llama", 2, 1, torch.float32),
    ("llama-1x2", "llama", 1, 2, torch.float32),
    ("llama-2x2", "llama", 2, 2, torch.float32),
    ("tied_sharded-2x1", "llama_tied_sharded", 2, 1, torch.float32),
    ("tied_sharded-1x2", "llama_tied_sharded", 1, 2, torch.float32),
    ("tied_sharded-2x2", "llama_tied_sharded", 2, 2, torch.float32),
    ("llama_bias-2x1", "llama_bias", 2, 1, torch.float32),
    ("qwen2-2x2", "qwen2", 2, 2, torch.float32),
    ("llama-2x2-bf16", "llama", 2, 2, torch.bfloat16),
]


def _make_checkpoint(name: str, directory: Path) -> torch.nn.Module:
    import transformers  # imported here: spawned ranks need not load the HF modeling code

    arch, extra, shard = CHECKPOINTS[name]
    config = getattr(transformers, f"{arch}Config")(**DIMS, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    with torch.no_grad():  # larger, non-trivial weights so that mapping errors show up clearly
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask [4, 12], right-padded rows 1 and 3."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 9:] = 0
    mask[3, 5:] = 0
    return ids, mask


def _teacher_world(
    rank: int, world: int, ckpts: dict[str, str], ids: torch.Tensor, mask: torch.Tensor
) -> Any:
    """Every case on every rank: build the topology (collective), run the teacher on its ranks."""
    import torch.distributed as dist

    from cot2align.distributed.topology import StudentParallelConfig, TeacherParallelConfig, Topology
    from cot2align.teacher.megatron_model import MegatronTeacher

    results: dict[str, Any] = {}
    for case, ckpt, tp, pp, dtype in CASES:
        topo = Topology(TeacherParallelConfig(tp=tp, pp=pp, replicas=1), StudentParallelConfig(), world, rank)
        topo.create_groups()
        if topo.role() == "student":
            results[case] = None
            continue
        pgc = topo.teacher_pg_collection()
        teacher = MegatronTeacher(ckpts[ckpt], pgc, dtype=dtype)
        mbs = 2 if pp > 1 else None  # two micro-batches in flight through the pipeline
        hidden = teacher.forward_hidden(ids, mask, SERVED, micro_batch_size=mbs)
        logits = teacher.logits(ids, mask, micro_batch_size=mbs)
        results[case] = {
            "coord": tuple(topo.teacher_coord()),
            "owner": {x: topo.stage_of_layer(x, LAYERS) for x in SERVED},
            "hidden": {k: v.float() for k, v in hidden.items()},
            "logits": None if logits is None else logits.float(),
            "requires_grad": any(p.requires_grad for p in teacher.model.parameters()),
            "training": teacher.model.training,
            "groups": {
                k: None if getattr(pgc, k) is None else dist.get_process_group_ranks(getattr(pgc, k))
                for k in ("tp", "pp", "mp", "embd", "pos_embd", "cp", "tp_cp", "dp", "dp_cp")
            },
        }
    return results


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """HF references and the results of every case from one distributed run."""
    ids, mask = _batch()
    refs: dict[str, Any] = {}
    dirs: dict[str, str] = {}
    for name in CHECKPOINTS:
        directory = tmp_path_factory.mktemp(name)
        model = _make_checkpoint(name, directory)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_hidden_states=True)
        refs[name] = {"hidden": out.hidden_states, "logits": out.logits}
        dirs[name] = str(directory)
    ranks = run_distributed(_teacher_world, WORLD, dirs, ids, mask, timeout_s=420)
    return {"refs": refs, "ranks": ranks, "mask": mask.bool(), "dirs": dirs}


@pytest.mark.slow
@pytest.mark.parametrize(("case", "ckpt", "tp", "pp", "dtype"), CASES, ids=[c[0] for c in CASES])
def test_teacher_matches_hf(
    world: dict[str, Any], case: str, ckpt: str, tp: int, pp: int, dtype: torch.dtype
) -> None:
    ref, valid = world["refs"][ckpt], world["mask"]
    results = [r[case] for r in world["ranks"]]
    assert all(r is None for r in results[tp * pp :]), "ranks after the teacher are students"
    teachers = results[: tp * pp]
    assert [r["coord"] for r in teachers] == [(0, p, t) for p in range(pp) for t in range(tp)]
    fp32 = dtype == torch.float32
    seen: set[int] = set()
    for r in teachers:
        _, stage, _ = r["coord"]
        assert not r["requires_grad"] and not r["training"]
        # each stage returns exactly the served layers it owns (topology and model agree)
        expected = {x % (LAYERS + 1) for x in SERVED if r["owner"][x] == stage}
        assert set(r["hidden"]) == expected
        seen |= expected
        for layer, h in r["hidden"].items():
            want = ref["hidden"][layer]
            assert h.shape == want.shape  # [B, T, d]: full hidden size on every TP rank
            err = (h - want)[valid].abs().max().item()
            tol = 1e-4 if fp32 else 0.05 * want[valid].abs().max().item()
            assert err <= tol, f"{case} layer {layer} rank {r['coord']}: max abs diff {err}"
        if stage == pp - 1:
            assert r["logits"].shape == ref["logits"].shape  # sliced to the true vocabulary
            err = (r["logits"] - ref["logits"])[valid].abs().max().item()
            tol = 1e-4 if fp32 else 0.05 * ref["logits"][valid].abs().max().item()
            assert err <= tol, f"{case} logits rank {r['coord']}: max abs diff {err}"
        else:
            assert r["logits"] is None
    assert seen == {x % (LAYERS + 1) for x in SERVED}
    if (tp, pp) == (2, 2):  # megatron's group collection of each rank of a TP2 x PP2 replica
        assert [r["groups"]["tp"] for r in teachers] == [[0, 1], [0, 1], [2, 3], [2, 3]]
        assert [r["groups"]["pp"] for r in teachers] == [[0, 2], [1, 3], [0, 2], [1, 3]]
        assert [r["groups"]["embd"] for r in teachers] == [[0, 2], [1, 3], [0, 2], [1, 3]]
        assert [r["groups"]["pos_embd"] for r in teachers] == [[0], [1], None, None]
        assert all(r["groups"]["mp"] == [0, 1, 2, 3] for r in teachers)
        assert all(r["groups"]["tp_cp"] == r["groups"]["tp"] for r in teachers)
        assert all(r["groups"][k] == [i] for i, r in enumerate(teachers) for k in ("cp", "dp", "dp_cp"))
    # hidden states are replicated over TP (no sequence parallelism): bitwise equal
    for p in range(pp):
        stage = [r for r in teachers if r["coord"][1] == p]
        for layer in stage[0]["hidden"]:
            assert all(torch.equal(s["hidden"][layer], stage[0]["hidden"][layer]) for s in stage)


# --------------------------------------------------------------------------- single-process units
def test_padded_vocab_and_mask() -> None:
    assert padded_vocab_size(250, 1) == 256 and padded_vocab_size(250, 2) == 256
    assert padded_vocab_size(257, 2) == 512 and padded_vocab_size(49152, 4) == 49152
    mask = megatron_attention_mask(torch.tensor([[1, 1, 0]]))  # [1, 1, 3, 3], True = masked
    assert mask.tolist() == [[[[False, True, True], [False, False, True], [False, False, True]]]]


def test_shard_state_reads_slices_of_sharded_checkpoint(tmp_path: Path) -> None:
    _make_checkpoint("llama_tied_sharded", tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "checkpoint should be sharded"
    cfg = LlamaFamilyConfig.from_pretrained(tmp_path)
    assert cfg.tie_word_embeddings and cfg.num_query_groups == 4 and cfg.vocab_size == VOCAB
    with CheckpointReader(tmp_path) as reader:
        assert reader.shape("model.embed_tokens.weight") == [VOCAB, 64]
        last = megatron_shard_state(reader, cfg, tp_rank=1, tp=2, pp_rank=1, pp=2)
        embed = reader.read("model.embed_tokens.weight")
    # rank 1 of 2 holds padded-vocab rows 128:256; rows past the true vocabulary are zero
    out = last["output_layer.weight"]
    assert out.shape == (128, 64)
    assert torch.equal(out[: VOCAB - 128], embed[128:]) and not out[VOCAB - 128 :].any()
    assert "embedding.word_embeddings.weight" not in last
    assert last["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (2 * (2 * 8 + 8 + 8), 64)
    assert last["decoder.layers.0.mlp.linear_fc1.weight"].shape == (128, 64)
    assert last["decoder.layers.0.mlp.linear_fc2.weight"].shape == (64, 64)


def test_config_reading_rejects_unsupported() -> None:
    from transformers import LlamaConfig, Qwen2Config

    with pytest.raises(ValueError, match="model types llama, mistral, qwen2"):
        LlamaFamilyConfig.from_hf(type("C", (), {"model_type": "gemma3"})())
    yarn = LlamaConfig(**DIMS, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        LlamaFamilyConfig.from_hf(yarn)
    qwen = LlamaFamilyConfig.from_hf(Qwen2Config(**DIMS))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None
