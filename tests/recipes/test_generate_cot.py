"""generate-cot: resume without repeated work, the answer-consistency filter, sharding, input untouched."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cot2align.cot.generate import (
    CotGenConfig,
    generate_rationales,
    hf_generate_fn,
    judge_generation,
    load_done,
    merge_shards,
    rationales_for,
    shard_examples,
    shard_path,
    split_generation,
    stats_path,
)
from cot2align.data.jsonl import DataError, Example, read_jsonl
from cot2align.data.prompts import cot_prompt
from cot2align.models import TinyModelConfig, build_tiny_model, load_tokenizer

TINY = TinyModelConfig(arch="llama", layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, max_positions=512)


@pytest.fixture(scope="module")
def teacher(tiny_task: dict[str, Path]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = load_tokenizer(tiny_task["tok_teacher"])
    return build_tiny_model(TINY, tok, seed=0), tok


def _train(tiny_task: dict[str, Path], n: int) -> list[Example]:
    rows, _ = read_jsonl(tiny_task["train"])
    return [dataclasses.replace(ex, rationale=None) for ex in rows[:n]]


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Crash(RuntimeError):
    pass


# ----------------------------------------------------------------------------- resume


def test_interrupt_and_resume_repeats_no_work(tiny_task: dict[str, Path], teacher: tuple, tmp_path: Path) -> None:
    model, tok = teacher
    examples = _train(tiny_task, 10)
    cfg = CotGenConfig(batch_size=4, max_new_tokens=6, filter=False, max_tries=1, temperature=1.0)
    real = hf_generate_fn(model, tok, cfg)
    prompted: list[str] = []

    def counting(prompts: list[str], seed: int) -> list[str]:
        prompted.extend(prompts)
        return real(prompts, seed)

    def crash_after_first(batch: int, ids: list[str]) -> None:
        raise Crash(f"simulated crash after batch {batch}")

    out = tmp_path / "cot.jsonl"
    with pytest.raises(Crash):
        generate_rationales(examples, counting, cfg, out, on_batch=crash_after_first)
    assert len(prompted) == 4
    first_rows = {json.loads(line)["id"]: line for line in out.read_text().splitlines()}
    assert len(first_rows) == 4
    # the crash also left half a line behind (killed mid-write)
    missing = [ex.id for ex in examples if ex.id not in first_rows]
    with out.open("a") as f:
        f.write(json.dumps({"id": missing[0], "instruction": "x"})[:17])

    prompted.clear()
    stats = generate_rationales(examples, counting, cfg, out)
    assert sorted(prompted) == sorted(cot_prompt(ex) for ex in examples if ex.id in missing)
    assert len(prompted) == 6
    assert (stats.generated_now, stats.resumed, stats.examples, stats.generations) == (6, 4, 10, 10)
    assert _ids(out) == [ex.id for ex in examples]  # each id exactly once, in input order
    final = {json.loads(line)["id"]: line for line in out.read_text().splitlines()}
    assert all(final[i] == line for i, line in first_rows.items())  # done rows kept as they were
    assert json.loads(stats_path(out).read_text())["generations"] == 10

    prompted.clear()
    again = generate_rationales(examples, counting, cfg, out)
    assert prompted == [] and again.resumed == 10 and again.generated_now == 0


def test_load_done_cuts_broken_last_line_and_rejects_broken_middle(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    good = json.dumps({"id": "a", "output": "1"}) + "\n"
    out.write_text(good + '{"id": "b", "outp\n')  # newline-terminated but broken last line
    assert list(load_done(out, {"a", "b"})) == ["a"]
    assert out.read_text() == good
    out.write_text(good + json.dumps({"id": "b"}))  # a complete object whose newline never came
    assert list(load_done(out, {"a", "b"})) == ["a"] and out.read_text() == good
    out.write_text('{"id": "b", "outp\n' + good)
    with pytest.raises(DataError, match=":1: broken row"):
        load_done(out, {"a", "b"})
    out.write_text(good)
    with pytest.raises(DataError, match="not in the input"):
        load_done(out, {"b"})


# ----------------------------------------------------------------------------- the filter


def test_judge_generation() -> None:
    text = "He buys 2: 3 + 2 = 5.\nTherefore, the answer is: 5"
    assert split_generation(text) == "He buys 2: 3 + 2 = 5."
    assert judge_generation(text, "5", "the_answer_is") == ("He buys 2: 3 + 2 = 5.", True)
    assert judge_generation(text, "6", "the_answer_is") == (None, True)
    assert judge_generation(text, None, "the_answer_is") == ("He buys 2: 3 + 2 = 5.", False)
    assert judge_generation(text, "6", "none") == ("He buys 2: 3 + 2 = 5.", False)
    assert judge_generation("Therefore, the answer is: 5", "5", "the_answer_is") == (None, False)  # empty
    assert judge_generation("   ", None, "none") == (None, False)
    # the answer is read from the whole text, not the rationale: a right number inside it is not enough
    assert judge_generation("5 apples.\nTherefore, the answer is: 4", "5", "the_answer_is") == (None, True)
    assert judge_generation("so 3 + 4 = 7 #### 7", "7", "gsm8k") == ("so 3 + 4 = 7 #### 7", True)


def _ex(i: int, answer: str) -> Example:
    return Example(id=f"ex{i}", instruction=f"question {i}?", input="", output=answer, answer=answer)


class Scripted:
    """A fake teacher: per example, the answer it states on its 1st, 2nd, ... try."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.tries = dict.fromkeys(script, 0)
        self.calls: list[tuple[int, int]] = []  # (number of prompts, seed)

    def __call__(self, prompts: list[str], seed: int) -> list[str]:
        self.calls.append((len(prompts), seed))
        out = []
        for p in prompts:
            q = next(q for q in self.script if f"{q}?" in p)
            said = self.script[q][min(self.tries[q], len(self.script[q]) - 1)]
            self.tries[q] += 1
            out.append(f"reasoning for {q} try {self.tries[q]}.\nTherefore, the answer is: {said}")
        return out


def test_filter_keeps_right_drops_wrong_and_regenerates(tmp_path: Path) -> None:
    examples = [_ex(1, "5"), _ex(2, "7"), _ex(3, "9")]
    script = {"question 1": ["5"], "question 2": ["1", "7"], "question 3": ["2", "3", "4"]}
    fake = Scripted(script)
    res = rationales_for(examples, fake, CotGenConfig(max_tries=3), seed=0)
    assert [r for r, _ in res] == [["reasoning for question 1 try 1."], ["reasoning for question 2 try 2."], []]
    assert [n for n, _ in fake.calls] == [3, 2, 1]  # only the rejected samples are regenerated
    assert len({s for _, s in fake.calls}) == 3  # each try has a new seed
    assert res[0][1] == dict(kept=1, dropped=0, regenerated=0, regenerations=0, unchecked=0, generations=1)
    assert res[1][1] == dict(kept=1, dropped=0, regenerated=1, regenerations=1, unchecked=0, generations=2)
    assert res[2][1] == dict(kept=0, dropped=1, regenerated=1, regenerations=2, unchecked=0, generations=3)

    out = tmp_path / "cot.jsonl"
    stats = generate_rationales(examples, Scripted(script), CotGenConfig(max_tries=3), out)
    assert (stats.kept, stats.dropped, stats.regenerated, stats.regenerations) == (2, 1, 2, 3)
    assert (stats.with_rationale, stats.without_rationale, stats.generations) == (2, 1, 6)
    saved = json.loads(stats_path(out).read_text())
    assert (saved["kept"], saved["dropped"], saved["regenerated"]) == (2, 1, 2)
    rows, _ = read_jsonl(out)  # the output is valid training data
    assert [r.rationale for r in rows] == ["reasoning for question 1 try 1.", "reasoning for question 2 try 2.",
                                            None]  # the example without a valid rationale falls back to std


def test_filter_without_retries_drops_and_filter_off_keeps(tmp_path: Path) -> None:
    examples = [_ex(1, "5"), _ex(2, "7")]
    script = {"question 1": ["5"], "question 2": ["1", "7"]}
    fake = Scripted(script)
    res = rationales_for(examples, fake, CotGenConfig(max_tries=1), seed=0)
    assert [r for r, _ in res] == [["reasoning for question 1 try 1."], []]
    assert len(fake.calls) == 1 and res[1][1]["regenerated"] == 0 and res[1][1]["dropped"] == 1

    res = rationales_for(examples, Scripted(script), CotGenConfig(max_tries=3, filter=False), seed=0)
    assert [r for r, _ in res] == [["reasoning for question 1 try 1."], ["reasoning for question 2 try 1."]]
    assert [c["unchecked"] for _, c in res] == [1, 1]

    calls: list[int] = []

    def empty_then_text(prompts: list[str], seed: int) -> list[str]:
        calls.append(len(prompts))
        return ["" if len(calls) == 1 else "x.\nTherefore, the answer is: 5" for _ in prompts]

    res = rationales_for([_ex(1, "5")], empty_then_text, CotGenConfig(max_tries=2, filter=False), seed=0)
    assert res[0][0] == ["x."] and res[0][1]["regenerated"] == 1 and calls == [1, 1]  # empty = invalid


def test_samples_per_example(tmp_path: Path) -> None:
    fake = Scripted({"question 1": ["5", "4", "5"]})
    out = tmp_path / "cot.jsonl"
    stats = generate_rationales([_ex(1, "5")], fake, CotGenConfig(samples_per_example=3, max_tries=1), out)
    row = json.loads(out.read_text())
    assert row["rationale"] == "reasoning for question 1 try 1."
    assert row["rationales"] == ["reasoning for question 1 try 1.", "reasoning for question 1 try 3."]
    assert (stats.kept, stats.dropped, fake.calls[0][0]) == (2, 1, 3)


# ----------------------------------------------------------------------------- sharding


def test_shards_merge_in_input_order(tmp_path: Path) -> None:
    examples = [_ex(i, str(i)) for i in range(7)]
    script = {f"question {i}": [str(i)] for i in range(7)}
    assert [ex.id for ex in shard_examples(examples, 1, 3)] == ["ex1", "ex4"]
    whole = tmp_path / "whole.jsonl"
    generate_rationales(examples, Scripted(script), CotGenConfig(batch_size=2), whole)
    out = tmp_path / "cot.jsonl"
    shards = [shard_path(out, r, 3) for r in range(3)]
    for r in range(3):
        generate_rationales(examples, Scripted(script), CotGenConfig(batch_size=2), shards[r], rank=r,
                            world_size=3)
        assert _ids(shards[r]) == [f"ex{i}" for i in range(r, 7, 3)]
    with pytest.raises(DataError, match="no row in the shards"):
        merge_shards(examples, shards[:2], out)
    stats = merge_shards(examples, shards, out)
    assert out.read_text() == whole.read_text() and stats.kept == 7


# ----------------------------------------------------------------------------- the stage


def test_generate_cot_stage_leaves_input_untouched(tiny_task: dict[str, Path], teacher: tuple,
                                                   tmp_path: Path) -> None:
    from cot2align.config import Config
    from cot2align.recipes.cot import generate_cot, output_path, read_source

    model, tok = teacher
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    lines = tiny_task["train"].read_text().splitlines()[:6]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    gold = {json.loads(line)["id"]: json.loads(line)["rationale"] for line in lines}
    before = _sha(train)
    cfg = Config().with_overrides([
        f"run.work_dir={tmp_path / 'work'}", f"data.train_file={train}", f"teacher.path={tmp_path / 'teacher'}",
        f"student.tokenizer={tiny_task['tok_student']}", "cot.max_new_tokens=5", "cot.filter=false",
        "cot.batch_size=4"])
    out = generate_cot(cfg)
    assert _sha(train) == before
    assert out == output_path(cfg) and out != train and out.parent == tmp_path / "work"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(gold)
    assert all(r.get("rationale") != gold[r["id"]] for r in rows)  # gold rationales are not carried over
    assert all(r["cot_gen"]["generations"] >= 1 for r in rows)
    assert [ex.rationale for ex in read_source(cfg)] == [None] * len(rows)  # read without gold rationales
    assert len(json.loads((tmp_path / "work" / (out.stem + ".stats.json")).read_text())) > 0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_is_a_clear_error(tiny_task: dict[str, Path], teacher: tuple,
                                                     tmp_path: Path) -> None:
    from cot2align.config import Config
    from cot2align.configbase import ConfigError
    from cot2align.recipes.cot import generate_cot, output_path

    model, tok = teacher
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    cfg = Config().with_overrides([
        f"run.work_dir={tmp_path / 'work'}", f"data.train_file={tiny_task['train']}",
        f"teacher.path={tmp_path / 'teacher'}", f"student.tokenizer={tiny_task['tok_student']}", "cot.backend=vllm"])
    with pytest.raises(ConfigError, match=r"cot\.backend=vllm: vLLM is not installed"):
        generate_cot(cfg)
    assert not output_path(cfg).exists()  # nothing written
    # the backend is not part of the output's name: hf and vLLM runs resume each other's files
    assert output_path(cfg) == output_path(cfg.with_overrides(["cot.backend=hf"]))


# ----------------------------------------------------------------------------- chat templates

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture()
def chat_tok(tiny_task: dict[str, Path]) -> PreTrainedTokenizerBase:
    """The tiny BPE tokenizer turned into a ChatML one (its EOS stays the plain end-of-text token)."""
    tok = load_tokenizer(tiny_task["tok_teacher"])
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    return tok


def test_model_input_ids_with_and_without_chat_template(tiny_task: dict[str, Path],
                                                        chat_tok: PreTrainedTokenizerBase) -> None:
    from cot2align.data.prompts import model_input_ids, model_input_text
    from cot2align.evaluate import prompt_ids

    ex = _train(tiny_task, 1)[0]
    prompt = cot_prompt(ex)
    plain = load_tokenizer(tiny_task["tok_teacher"])
    bos_prompt = [plain.bos_token_id, *plain.encode(prompt, add_special_tokens=False)]
    assert model_input_ids(plain, prompt, "auto") == prompt_ids(plain, prompt) == bos_prompt  # no template
    text = model_input_text(chat_tok, prompt, "auto")
    assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    ids = prompt_ids(chat_tok, prompt)
    assert ids == chat_tok.encode(text, add_special_tokens=False) and ids[0] != chat_tok.bos_token_id
    assert ids[0] == chat_tok.convert_tokens_to_ids("<|im_start|>")  # a special token, not split into pieces
    assert prompt_ids(chat_tok, prompt, "none") == model_input_ids(chat_tok, prompt, "none") == bos_prompt
    with pytest.raises(ValueError, match="chat_template"):
        model_input_ids(chat_tok, prompt, "chatml")  # type: ignore[arg-type]


def test_generation_tokenizer_stops_at_end_of_turn(chat_tok: PreTrainedTokenizerBase) -> None:
    from cot2align.data.prompts import end_of_turn_id, generation_tokenizer, model_input_ids

    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    eos = chat_tok.eos_token_id
    assert end_of_turn_id(chat_tok) == im_end != eos
    gen = generation_tokenizer(chat_tok, "auto")
    assert gen is not chat_tok and gen.eos_token_id == im_end  # generation stops and is cut at <|im_end|>
    assert chat_tok.eos_token_id == eos  # the caller's tokenizer is left alone
    assert model_input_ids(gen, "hi") == model_input_ids(chat_tok, "hi")
    plain = generation_tokenizer(chat_tok, "none")
    assert not plain.chat_template and chat_tok.chat_template == CHATML
    assert model_input_ids(plain, "hi") == model_input_ids(chat_tok, "hi", "none")
    assert end_of_turn_id(plain) is None and generation_tokenizer(plain, "auto") is plain


def test_cot_chat_template_config(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    from cot2align.config import Config
    from cot2align.configbase import ConfigError
    from cot2align.recipes.cot import output_path

    cfg = Config().with_overrides([f"run.work_dir={tmp_path}"])
    assert cfg.cot.chat_template == "auto"
    assert output_path(cfg) != output_path(cfg.merged({"cot": {"chat_template": "none"}}))
    with pytest.raises(ConfigError, match=r"cot\.chat_template: got 'chatml'"):
        Config().with_overrides(["cot.chat_template=chatml"])
