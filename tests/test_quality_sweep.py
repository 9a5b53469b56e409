"""bench/quality.py bookkeeping: epsilon tuning on dev, which (row, seed) runs, the table."""

from __future__ import annotations

import importlib.util
import statistics

import pytest

from cot2align.configbase import REPO_ROOT

REPO = REPO_ROOT
_spec = importlib.util.spec_from_file_location("quality_sweep", REPO / "bench" / "quality.py")
assert _spec is not None and _spec.loader is not None
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def _grid(dev: dict[float, float], seed: int = 1) -> list[dict]:
    """Dev EM records of the whole epsilon grid at `seed`: 5.0 unless given."""
    return [{"row": row, "seed": seed, "dev_em": dev.get(eps, 5.0)} for eps, row in quality.EPSILON_ROWS.items()]


def test_tuned_epsilon_is_best_dev_and_ties_go_to_reference() -> None:
    assert quality.tuned_epsilon(_grid({1.0: 5.0, 3.0: 7.5, 10.0: 7.0, 30.0: 6.5}), 1) == 3.0
    assert quality.tuned_epsilon(_grid({1.0: 7.0, 3.0: 6.0, 10.0: 7.0, 30.0: 2.0}), 1) == 10.0
    # another seed's dev numbers do not count; an incomplete grid tunes nothing
    assert quality.tuned_epsilon(_grid({1.0: 9.0, 3.0: 1.0, 10.0: 1.0, 30.0: 1.0}, seed=2), 1) is None
    grid = _grid({3.0: 7.5})
    assert quality.tuned_epsilon(grid, 1) == 3.0
    assert quality.tuned_epsilon([r for r in grid if r["row"] != "cot2align eps 30"], 1) is None


def test_only_the_tuned_and_reference_grid_rows_run_the_later_seeds() -> None:
    records = _grid({0.1: 7.5, 10.0: 7.0})
    runs = {row for row in quality.ROWS if quality.wanted(row, 2, 1, records)}
    assert runs == set(quality.ROWS) - set(quality.EPSILON_ROWS.values()) | {"cot2align eps 0.1", "cot2align (dskd)"}
    assert all(quality.wanted(row, 1, 1, []) for row in quality.ROWS)  # the first seed runs the whole grid
    # before the grid finished, the later seeds skip every non-reference grid row
    assert not quality.wanted("cot2align eps 3", 2, 1, records[:2])
    assert quality.wanted("cot2align (dskd)", 2, 1, [])


def test_table_is_mean_and_std_over_seeds() -> None:
    records = [{"row": "sft", "seed": s, "exact_match": em, "rouge_l": em + 1, "held_out_em": 1.0,
                "greedy_em": 2.0 * s, "dev_em": 5.0, "wall_s": w}
               for s, em, w in ((1, 4.0, 60.0), (2, 6.0, 90.0), (3, 11.0, 600.0))]
    teacher = {"exact_match": 23.0, "rouge_l": 23.0, "held_out_em": 6.0, "greedy_em": 31.0}
    md = quality.table(records, teacher, 1)
    sft = next(line for line in md.splitlines() if line.startswith("| sft |")).split("|")
    em = [4.0, 6.0, 11.0]
    assert sft[2].strip() == "3"
    assert sft[3].strip() == f"{statistics.mean(em):.1f} ± {statistics.stdev(em):.1f}"
    assert sft[5].strip() == "1.0 ± 0.0"
    assert sft[6].strip() == "4.0 ± 2.0"
    assert sft[8].strip() == "1.5"  # the median run (90 s), robust to one resumed or stalled run
    assert "| teacher | - | 23.0 | 23.0 | 6.0 | 31.0 |" in md


@pytest.mark.parametrize("row", list(quality.ROWS))
def test_every_row_is_a_valid_config(row: str) -> None:
    from cot2align.config import load_config

    base = load_config(str(REPO / "configs" / "experiments" / "quality.yaml"), [])
    pinned = {"cot": {"enabled": False}}
    cfg = quality.run_config(base, pinned, row, 2)
    assert cfg.run.seed == 2 and cfg.run.name == quality.run_name(base, row, 2)
    assert cfg.loss.name == quality.ROWS[row]["loss"]["name"]
