"""bench/quality.py bookkeeping: which (row, seed) runs, the table, plan entropy and dev curves, row configs."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest
import scipy.stats

from cot2align.configbase import REPO_ROOT

REPO = REPO_ROOT
_spec = importlib.util.spec_from_file_location("quality_sweep", REPO / "bench" / "quality.py")
assert _spec is not None and _spec.loader is not None
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def test_one_seed_rows_run_the_first_seed_only() -> None:
    assert all(quality.wanted(row, 1, 1) for row in quality.ROWS)
    assert {row for row in quality.ROWS if not quality.wanted(row, 2, 1)} == quality.ONE_SEED
    assert quality.ONE_SEED <= set(quality.ROWS)


def test_table_is_mean_and_std_over_seeds() -> None:
    records = [{"row": "sft", "seed": s, "exact_match": em, "greedy_em": 2.0 * s, "cot_em": 1.0, "held_out_em": 1.0,
                "dev_em": 5.0, "steps": 100 * s, "early_stopped": s < 3, "wall_s": w}
               for s, em, w in ((1, 4.0, 60.0), (2, 6.0, 90.0), (3, 11.0, 600.0))]
    teacher = {"exact_match": 63.0, "greedy_em": 71.0, "held_out_em": 40.0}
    md = quality.table(records, teacher)
    header = [c.strip() for c in md.splitlines()[0].split("|")]
    sft = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| sft |")).split("|")]
    cell = dict(zip(header, sft, strict=True))
    em = [4.0, 6.0, 11.0]
    assert cell["seeds"] == "3"
    assert cell["test EM (std prompt)"] == f"{statistics.mean(em):.1f} ± {statistics.stdev(em):.1f}"
    assert cell["greedy"] == "4.0 ± 2.0"
    assert cell["4-step (held out)"] == "1.0 ± 0.0"
    assert cell["steps"] == "200 ± 100"
    assert cell["early stops"] == "2/3"
    assert cell["minutes / run"] == "1.5"  # the median run (90 s), robust to one resumed or stalled run
    assert md.splitlines()[2].startswith("| teacher (CoT prompt) | - | 63.0 | 71.0 |")


def test_plan_entropy_and_dev_curve(tmp_path: Path) -> None:
    import json

    rows = [{"step": i, "train/loss": 1.0, "train/ot/entropy/main_main": 0.5 + i, "train/ot/entropy/layer0_0": 1.0,
             "train/ot/main_main": 3.0} for i in range(10, 101, 10)]
    rows.insert(3, {"step": 40, "dev/exact_match": 12.5})
    rows.append({"step": 200, "dev/exact_match": 20.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ent = quality.plan_entropy(tmp_path, last_steps=30)  # the rows of steps 80, 90, 100
    assert ent == {"layer0_0": 1.0, "main_main": statistics.mean([80.5, 90.5, 100.5])}
    assert quality.dev_curve(tmp_path) == [(40, 12.5), (200, 20.0)]
    assert quality.plan_entropy(tmp_path / "nothing") == {}


@pytest.mark.parametrize("row", list(quality.ROWS))
def test_every_row_is_a_valid_config(row: str) -> None:
    from cot2align.config import load_config

    base = load_config(str(REPO / "configs" / "experiments" / "quality.yaml"), [])
    pinned = {"cot": {"enabled": False}}
    cfg = quality.run_config(base, pinned, row, 2)
    assert cfg.run.seed == 2 and cfg.run.name == quality.run_name(base, row, 2)
    assert cfg.loss.name == quality.ROWS[row]["loss"]["name"]


def test_rows_read_the_teacher_cache_of_their_data() -> None:
    """With the teacher cache pinned, every row reads, from the cache of its data.use_cot, and needs
    no teacher layer beyond what cache-teacher stores (the final and OT layers)."""
    from cot2align.config import load_config
    from cot2align.models import resolve_layers
    from cot2align.recipes.cache import sweep_layers

    base = load_config(str(REPO / "configs" / "experiments" / "quality.yaml"), [])
    pinned = {"cot": {"enabled": False}, "teacher": {"cache": {"mode": "read", "dtype": "float32"}}}
    dirs = set()
    for row in quality.ROWS:
        cfg = quality.run_config(base, pinned, row, 1)
        assert cfg.teacher.cache.mode == "read"
        assert cfg.teacher.cache.dir.endswith("cot" if cfg.data.use_cot else "std")
        dirs.add(cfg.teacher.cache.dir)
        assert set(resolve_layers([-1, *cfg.loss.ot.teacher_layers], 4)) <= set(sweep_layers(base, 4)), row
    assert len(dirs) == 2


def test_a_run_made_with_another_config_starts_over(tmp_path: Path) -> None:
    from cot2align.config import load_config

    base = load_config(str(REPO / "configs" / "experiments" / "quality.yaml"), [f"run.output_dir={tmp_path}"])
    cfg = quality.run_config(base, {"cot": {"enabled": False}}, "sft", 1)
    run_dir = Path(cfg.run_dir)
    assert not quality.clear_stale_run(cfg)  # nothing there
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    assert not quality.clear_stale_run(cfg) and run_dir.is_dir()  # the same config resumes
    (run_dir / "config.yaml").write_text(cfg.merged({"train": {"patience": 2}}).to_yaml())
    assert quality.clear_stale_run(cfg) and not run_dir.exists()


def test_term_gradient_norms_add_up_to_the_training_step_gradient(tiny_task: dict[str, Path],
                                                                 teacher_dir: Path, tmp_path: Path) -> None:
    """||g_ce + g_kd||^2 = ||g_ce||^2 + ||g_kd||^2 + 2 cos ||g_ce|| ||g_kd||, where the left side is the
    gradient of the training loop's step (micro_batch_loss over the global batch's micro-batches)."""
    import math

    import torch
    from jobs import tiny_job_config

    from cot2align.config import Config
    from cot2align.data.dataset import collate
    from cot2align.data.sampler import GlobalBatchSampler
    from cot2align.models import hidden_size, load_model, load_tokenizer, num_layers
    from cot2align.recipes.build import distill_loss, student_model
    from cot2align.recipes.prepare import read_samples
    from cot2align.teacher.colocated import ColocatedTeacher
    from cot2align.train import micro_batch_loss, plan_step, response_tokens

    cfg = Config.from_dict(tiny_job_config(tiny_task, teacher_dir, tmp_path, "grads", loss={"name": "dskd"},
                                           train={"micro_batch_size": 2, "grad_accum": 2},
                                           student={"parallel": {"dp": 2}}))
    norms = quality.term_grad_norms(cfg, None, steps=1)
    assert set(norms) == {"ce", "kd", "cos/kd"} and norms["ce"] > 0 and norms["kd"] > 0

    s_tok, t_tok = load_tokenizer(tiny_task["tok_student"]), load_tokenizer(tiny_task["tok_teacher"])
    samples = read_samples(tiny_task["train"], cfg.data, s_tok, t_tok)
    torch.manual_seed(cfg.run.seed)
    student = student_model(cfg, s_tok)
    teacher = ColocatedTeacher(load_model(teacher_dir))
    loss_fn = distill_loss(cfg, student, hidden_size(teacher.model), s_tok, t_tok)
    plan = plan_step(loss_fn, num_layers(student), teacher.final_layer, True, False)
    sampler = GlobalBatchSampler(len(samples), 2, 2, 2, cfg.run.seed)
    micro = sampler.micro_batches(0, 0) + sampler.micro_batches(0, 1)  # both replicas' step 0
    tokens = float(sum(response_tokens(samples, m) for m in micro))
    for idx in micro:
        batch = collate([samples[i] for i in idx], {"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id})
        micro_batch_loss(student, num_layers(student), loss_fn, batch, teacher, plan, tokens,
                         float(sum(map(len, micro)))).total.backward()
    full = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in student.parameters() if p.grad is not None))
    ce, kd, cos = norms["ce"], norms["kd"], norms["cos/kd"]
    assert math.isclose(full, math.sqrt(ce**2 + kd**2 + 2 * cos * ce * kd), rel_tol=1e-4)


def test_report_sections_average_over_seeds() -> None:
    records = [{"row": "dskd", "seed": 1, "by_steps": {"2": 10.0, "4": 1.0}, "entropy": {},
                "dev_curve": [[200, 4.0], [400, 6.0]]},
               {"row": "dskd", "seed": 2, "by_steps": {"2": 20.0, "4": 3.0}, "entropy": {},
                "dev_curve": [[200, 8.0]]},  # stopped early: step 400 is the first seed's alone
               {"row": "cot2align (dskd)", "seed": 1, "by_steps": {"2": 30.0, "4": 5.0},
                "entropy": {"main_main": 0.5, "layer0_0": 0.9}, "dev_curve": [[200, 1.0], [400, 2.0]]}]

    def cells(md: str, row: str) -> list[str]:
        return [c.strip() for c in next(x for x in md.splitlines() if x.startswith(f"| {row} |")).split("|")[1:-1]]

    assert cells(quality.by_steps_table(records), "dskd") == ["dskd", "2", "15.0 ± 7.1", "2.0 ± 1.4"]
    for r, em in zip(records, [5.0, 7.0, 9.0], strict=True):
        r.update(exact_match=em, greedy_em=em + 1, cot_em=em + 2, early_stopped=r["seed"] == 2)
    assert cells(quality.seeds_table(records), "dskd") == ["dskd", "5.0 / 6.0 / 7.0", "7.0 / 8.0 / 9.0 *"]
    assert cells(quality.seeds_table(records), "cot2align (dskd)") == ["cot2align (dskd)", "9.0 / 10.0 / 11.0", "-"]
    assert cells(quality.curves_table(records), "dskd") == ["dskd", "2", "6.0", "6.0"]
    assert cells(quality.entropy_table(records), "cot2align (dskd)") == ["cot2align (dskd)", "1", "0.900", "0.500"]
    assert "| dskd |" not in quality.entropy_table(records)  # no OT, no entropy line
    grads = {"dskd": {"initial": {"ce": 2.0, "kd": 4.0, "cos/kd": -0.1}, "best": {"ce": 0.5, "kd": 0.25, "cos/kd": 0.7}}}
    md = quality.grads_table(grads)
    assert "| dskd | initial | 2 | 4 | - | -0.1 | - |" in md and "| dskd | best | 0.5 | 0.25 | - | 0.7 | - |" in md
    for r in records:
        r.update(held_out_em=1.0, dev_em=2.0, steps=400, wall_s=60.0)
    assert "Gradient norm" in quality.report(records, None, grads)
    assert "Gradient norm" not in quality.report(records, None, {})  # no run to measure: no empty table


def test_paired_table_is_a_paired_t_test_seed_by_seed() -> None:
    ref, other = [17.0, 12.0, 23.0, 9.0], [16.0, 8.0, 15.0, 10.0]
    records = [{"row": row, "seed": s, "exact_match": em, "greedy_em": em + s}
               for row, ems in (("cot2align (dskd)", ref), ("dskd", other)) for s, em in enumerate(ems, 1)]
    records.append({"row": "sft", "seed": 1, "exact_match": 3.0, "greedy_em": 3.0})  # one seed: no test
    records.append({"row": "dskd", "seed": 9, "exact_match": 50.0, "greedy_em": 50.0})  # no partner: left out
    md = quality.paired_table(records)
    cells = [c.strip() for c in next(x for x in md.splitlines() if x.startswith("| dskd |")).split("|")[1:-1]]
    diffs = [a - b for a, b in zip(ref, other, strict=True)]
    expected = scipy.stats.ttest_rel(ref, other)
    assert cells[:4] == ["dskd", "4", "+1.0, +4.0, +8.0, -1.0",
                         f"{statistics.mean(diffs):.1f} ± {statistics.stdev(diffs):.1f}"]
    assert cells[4:6] == [f"{expected.statistic:.1f}", f"{expected.pvalue:.3f}"]
    assert cells[6:] == cells[3:4] + cells[4:6]  # greedy = sampled + seed: the same differences
    assert "| sft |" not in md
    assert quality._mean_std([-0.04, 0.0]) == "0.0 ± 0.0"
    assert quality.paired_table([r for r in records if r["row"] != "dskd"]) == ""


def test_doc_tables_go_between_the_markers_of_their_sweep(tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    page.write_text("# Results\n<!-- tables quality-long: cmd -->\nlong\n<!-- /tables -->\ntext\n"
                    "<!-- tables quality: cmd -->\nold | table\n<!-- /tables -->\n## After\n")
    quality.write_doc(page, "| new |", "quality")
    assert page.read_text() == ("# Results\n<!-- tables quality-long: cmd -->\nlong\n<!-- /tables -->\ntext\n"
                                "<!-- tables quality: cmd -->\n| new |\n<!-- /tables -->\n## After\n")
    quality.write_doc(page, "| newer |\n\n**more**", "quality-long")
    assert page.read_text().startswith("# Results\n<!-- tables quality-long: cmd -->\n| newer |\n\n**more**\n"
                                       "<!-- /tables -->\ntext\n<!-- tables quality: cmd -->\n| new |\n")
    plain = tmp_path / "table.md"
    quality.write_doc(plain, "| t |", "quality")
    assert plain.read_text() == "| t |\n"
    with pytest.raises(ValueError, match=r"results.md: has no '<!-- tables other -->'"):
        quality.write_doc(page, "| t |", "other")  # would lose the page
    assert "| newer |" in page.read_text()


def test_the_long_budget_setting_changes_only_the_budget() -> None:
    """quality-long.yaml reuses the sweep's teacher, data and caches: only its name and budget differ."""
    from cot2align.config import load_config
    from cot2align.configbase import changed_keys

    base = load_config(str(REPO / "configs" / "experiments" / "quality.yaml"), [])
    long = load_config(str(REPO / "configs" / "experiments" / "quality-long.yaml"), [])
    assert changed_keys(base.to_dict(), long.to_dict()) == ["run.name", "train.max_steps", "train.patience"]
    assert long.train.max_steps == 2 * base.train.max_steps and long.train.patience == 0
