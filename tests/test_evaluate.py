"""Evaluation: DSKD's protocol (seeds, ROUGE-L mean +- std), greedy decoding, sharding, CLI outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dist import run_distributed
from rouge_score import rouge_scorer
from tiny import TEACHER

from cot2align.configbase import ConfigError
from cot2align.data.embedded import extract_answer
from cot2align.data.jsonl import Example, read_jsonl
from cot2align.evaluate import (
    EvalConfig,
    Shard,
    build_prompt,
    evaluate_examples,
    evaluate_sharded,
    generate,
    prompt_ids,
    rouge_l,
)
from cot2align.models import build_tiny_model, load_model, load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny Llama saved as an HF checkpoint folder with its tokenizer."""
    tok = load_tokenizer(tiny_task["tok_teacher"])
    out = tmp_path_factory.mktemp("model")
    build_tiny_model(TEACHER, tok, seed=5).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(**kw: object) -> EvalConfig:
    base = dict(prompt="std", decoding="sample", seeds=[10, 20, 30], max_new_tokens=6, batch_size=4,
                no_repeat_ngram_size=0)
    return EvalConfig().merged({**base, **kw})


def test_rouge_l_is_max_over_references_with_stemming() -> None:
    assert rouge_l("the cat sat", ["a dog barked", "the cat sat"]) == pytest.approx(100.0)
    assert rouge_l("cats running", ["cat run"]) == pytest.approx(100.0)  # stemmer on
    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score("a b c d", "a c x")["rougeL"].fmeasure
    assert rouge_l("a c x", ["a b c d", "zzz"]) == pytest.approx(100.0 * ref)
    assert 0 < ref < 1


def test_seeds_are_reproducible_and_differ(model_dir: Path, tiny_task: dict[str, Path]) -> None:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    examples, _ = read_jsonl(tiny_task["test"])
    prompts = [build_prompt(ex, _cfg()) for ex in examples[:8]]
    a = generate(model, tok, prompts, _cfg(), seed=10)
    b = generate(model, tok, prompts, _cfg(), seed=10)
    c = generate(model, tok, prompts, _cfg(), seed=20)
    assert sorted(a) == list(range(8))
    assert a == b
    assert a != c


def test_greedy_equals_an_argmax_loop(model_dir: Path, tiny_task: dict[str, Path]) -> None:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    examples, _ = read_jsonl(tiny_task["test"])
    cfg = _cfg(decoding="greedy", max_new_tokens=3)
    prompts = [build_prompt(ex, cfg) for ex in examples[:3]]  # different lengths: left padding in one batch
    assert len({len(prompt_ids(tok, p)) for p in prompts}) > 1
    got = generate(model, tok, prompts, cfg, seed=0)
    for i, p in enumerate(prompts):
        ids = prompt_ids(tok, p)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(3):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert got[i] == tok.decode(new, skip_special_tokens=True).strip()


def test_scores_are_mean_and_std_over_seeds(model_dir: Path, tiny_task: dict[str, Path]) -> None:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    examples, _ = read_jsonl(tiny_task["test"])
    examples = examples[:10]
    # one row with extra references and no `answer`: ROUGE-L takes the max, exact match skips it
    examples[0] = Example("multi", "Say hi.", "", "hello there", meta={"references": ["hi", "greetings"]})
    cfg = _cfg(breakdown="steps")
    res = evaluate_examples(model, tok, examples, cfg)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rl = np.zeros((3, len(examples)))
    em = np.full((3, len(examples)), np.nan)
    for i, (row, ex) in enumerate(zip(res["per_example"], examples, strict=True)):
        refs = [ex.output, *ex.meta.get("references", [])]
        assert row["references"] == refs
        for k, gen in enumerate(row["generations"]):
            rl[k, i] = 100 * max(scorer.score(r, gen)["rougeL"].fmeasure for r in refs)
            if ex.answer is not None:
                em[k, i] = 100.0 * (extract_answer(gen, "the_answer_is") == extract_answer(ex.answer, "the_answer_is"))
    assert res["seeds"] == [10, 20, 30] and res["n"] == 10 and res["n_exact"] == 9
    assert [s["rouge_l"] for s in res["per_seed"]] == pytest.approx(rl.mean(1).tolist())
    assert res["rouge_l"] == pytest.approx(rl.mean(1).mean())
    assert res["rouge_l_std"] == pytest.approx(rl.mean(1).std())
    assert res["exact_match"] == pytest.approx(np.nanmean(em, 1).mean())
    assert res["exact_match_std"] == pytest.approx(np.nanmean(em, 1).std())
    steps = {str(ex.meta["steps"]) for ex in examples if "steps" in ex.meta}
    assert set(res["by_steps"]) == steps
    for s in steps:
        cols = [i for i, ex in enumerate(examples) if str(ex.meta.get("steps")) == s]
        assert res["by_steps"][s]["exact_match"] == pytest.approx(np.nanmean(em[:, cols], 1).mean())
        assert res["by_steps"][s]["n"] == len(cols)


def test_greedy_runs_one_seed_and_dev_config(model_dir: Path, tiny_task: dict[str, Path]) -> None:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    examples, _ = read_jsonl(tiny_task["test"])
    res = evaluate_examples(model, tok, examples[:4], _cfg(decoding="greedy"))
    assert res["seeds"] == [10] and res["rouge_l_std"] == 0.0
    cfg = EvalConfig()
    assert (cfg.decoding, cfg.seeds, cfg.top_k, cfg.top_p, cfg.temperature, cfg.no_repeat_ngram_size) == (
        "sample", [10, 20, 30, 40, 50], 0, 1.0, 1.0, 6)
    assert (cfg.for_dev().decoding, cfg.for_dev().seeds) == ("sample", [10])
    greedy = cfg.merged({"dev_decoding": "greedy"}).for_dev()
    assert (greedy.decoding, greedy.run_seeds()) == ("greedy", [10])
    assert cfg.merged({"dev_decoding": "all_seeds"}).for_dev().run_seeds() == [10, 20, 30, 40, 50]


@pytest.mark.parametrize(("override", "key"), [("eval.top_p=0", "eval.top_p"), ("eval.seeds=[]", "eval.seeds"),
                                               ("eval.seeds=[1,1]", "eval.seeds"),
                                               ("eval.no_repeat_ngram_size=-1", "eval.no_repeat_ngram_size"),
                                               ("eval.decoding=beam", "eval.decoding")])
def test_bad_eval_config_names_the_key(override: str, key: str) -> None:
    from cot2align.config import load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def _sharded(rank: int, world: int, model_dir: str, data: str) -> dict | None:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    examples, _ = read_jsonl(data)
    shard = Shard.from_dist()
    assert (shard.rank, shard.world) == (rank, world)
    return evaluate_sharded(model, tok, examples, _cfg(seeds=[10, 20]), shard)


@pytest.mark.slow
def test_two_ranks_give_the_same_generations_as_one(model_dir: Path, tiny_task: dict[str, Path]) -> None:
    results = run_distributed(_sharded, 2, str(model_dir), str(tiny_task["test"]), timeout_s=180)
    assert results[1] is None
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    examples, _ = read_jsonl(tiny_task["test"])
    single = evaluate_examples(model, tok, examples, _cfg(seeds=[10, 20]))
    assert len(examples) > 3 * 4  # several batches, split over the ranks
    assert results[0]["per_example"] == single["per_example"]
    assert results[0]["per_seed"] == single["per_seed"]


def test_cli_evaluates_several_files(model_dir: Path, tiny_task: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cot2align.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Name a colour.", "output": "Blue is a colour.", "category": "open_qa"},
        {"instruction": "Summarise.", "input": "A long text.", "output": "A text.", "references": ["Short."]},
    ]) + "\n")
    out = tmp_path / "out"
    rc = main(["evaluate", "--model", str(model_dir), "--data", str(tiny_task["dev"]), str(dolly),
               "--out", str(out), "eval.seeds=[10,20]", "eval.max_new_tokens=4", "eval.prompt=std"])
    assert rc == 0
    res = json.loads((out / "eval_results.json").read_text())["datasets"]
    assert set(res) == {"dev", "dolly"}
    n_dev = len(read_jsonl(tiny_task["dev"])[0])
    assert (res["dev"]["n"], res["dolly"]["n"]) == (n_dev, 2)
    assert "exact_match" in res["dev"] and "exact_match" not in res["dolly"]  # dolly rows have no answer
    for name in res:
        assert len([s["rouge_l"] for s in res[name]["per_seed"]]) == 2
        rows = [json.loads(line) for line in (out / f"generations_{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 2 * res[name]["n"]
        assert np.mean([r["rouge_l"] for r in rows]) == pytest.approx(res[name]["rouge_l"])
    table = (out / "eval_results.md").read_text()
    assert "| dev |" in table and "| dolly | 2 |" in table
    assert list(out.glob("wandb/offline-run-*/files/media/table/generations/dolly_*.table.json"))


def test_results_table_shows_mean_and_std() -> None:
    from cot2align.evaluate import results_table

    summary = {"teacher": {"exact_match": 31.25, "exact_match_std": 1.5, "rouge_l": 40.0, "rouge_l_std": 0.25,
                           "seeds": [10, 20, 30], "exact_match_by_steps": {"2": 60.0, "3": 30.0}},
               "student (sft)": {"exact_match": None, "rouge_l": 12.5, "rouge_l_std": 0.0}}
    table = results_table(summary).splitlines()
    assert table[2] == "| teacher | 31.25 ± 1.50 | 40.00 ± 0.25 | 60.0 | 30.0 |"
    assert table[3].startswith("| student (sft) | - | 12.50 ± 0.00 |")
    assert table[-1] == "mean ± std over seeds [10, 20, 30]"
