"""What a comparison's markdown says: the per-case table and its summary rows, the verdict, the target
sentence, several labels, and the section replaced in place."""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ds_seg3d import results
from ds_seg3d.experiment import markdown
from ds_seg3d.experiment.comparisons import COMPARISONS

PSOAS = COMPARISONS["psoas-adversarial"]


def _rows(rng: np.random.Generator, arms: dict[str, float], cases: int) -> list[dict]:
    rows = []
    for arm, shift in arms.items():
        for i in range(cases):
            rows.append({"arm": arm, "case": f"psoas_{i:03d}", "label": "psoas",
                         "dice": str(round(float(np.clip(0.8 + shift + rng.normal(0, 0.01), 0, 1)), 5)),
                         "volume_pred_ml": "1", "volume_true_ml": "1",
                         "volume_error_pct": str(round(float(rng.normal(0, 6)), 3))})
    return rows


def test_markdown_table_per_case_and_summary_rows() -> None:
    rows = _rows(np.random.default_rng(0), {"baseline": 0.0, "adversarial": 0.05}, 5)
    lines = markdown.markdown_table(rows, ["baseline", "adversarial"]).splitlines()
    assert lines[0].split("|")[1:-1] == [" case ", " Dice baseline ", " Dice adversarial ",
                                          " volume error % baseline ", " volume error % adversarial "]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    for arm_index, arm in enumerate(["baseline", "adversarial"]):
        mine = [r for r in rows if r["arm"] == arm]
        dice = [float(r["dice"]) for r in mine]
        err = [abs(float(r["volume_error_pct"])) for r in mine]
        assert cells[mine[2]["case"]][arm_index] == f"{dice[2]:.3f}"
        assert cells[mine[2]["case"]][2 + arm_index] == f"{float(mine[2]['volume_error_pct']):+.1f}"
        mean_row = next(v for k, v in cells.items() if k.startswith("**mean**"))
        median_row = next(v for k, v in cells.items() if k.startswith("**median**"))
        under5 = next(v for k, v in cells.items() if "under 5" in k)
        assert mean_row[arm_index] == f"{statistics.mean(dice):.3f}"
        assert median_row[2 + arm_index] == f"{statistics.median(err):.1f}"
        assert under5[2 + arm_index] == f"{sum(e < 5 for e in err)}/{len(err)}"


def test_verdict_says_what_the_numbers_show() -> None:
    rng = np.random.default_rng(1)
    same = _rows(rng, {"baseline": 0.0, "adversarial": 0.0}, 8)
    assert "no measurable effect" in markdown.verdict(same, "baseline", "adversarial")
    better = _rows(rng, {"baseline": 0.0, "adversarial": 0.1}, 8)
    sentence = markdown.verdict(better, "baseline", "adversarial")
    assert "adversarial raised Dice" in sentence
    signed = statistics.mean(float(r["volume_error_pct"]) for r in better if r["arm"] == "adversarial")
    assert f"mean volume error {signed:+.1f} %" in sentence
    worse = _rows(rng, {"baseline": 0.0, "adversarial": -0.1}, 8)
    assert "adversarial lowered Dice" in markdown.verdict(worse, "baseline", "adversarial")
    assert "too few cases" in markdown.verdict(_rows(rng, {"baseline": 0, "adversarial": 0.1}, 2),
                                                 "baseline", "adversarial")
    assert markdown.verdict(same[:8], "baseline", "adversarial").startswith("No comparison")


def test_replace_section_keeps_the_other_sections(tmp_path: Path) -> None:
    md = tmp_path / "EXPERIMENTS.md"
    results.replace_section(md, PSOAS.heading, "first\n", intro=markdown.INTRO)
    assert md.read_text().startswith(markdown.INTRO) and md.read_text().count(PSOAS.heading) == 1
    md.write_text(md.read_text() + "\n## Later\n\nkept\n")
    md.write_text(md.read_text().replace(markdown.INTRO, markdown.INTRO + "\n## Earlier\n\nalso kept\n"))
    body = "second\n\n```\n## not a heading inside a code block\n```\n"
    for _ in range(2):  # idempotent
        results.replace_section(md, PSOAS.heading, body, intro=markdown.INTRO)
    text = md.read_text()
    assert "first" not in text and text.count("second") == 1 and text.count(PSOAS.heading) == 1
    assert text.index("## Earlier") < text.index(PSOAS.heading) < text.index("second") < text.index("## Later")
    assert "also kept" in text and "kept\n" in text and "not a heading inside" in text
    assert not list(tmp_path.glob(".tmp-*"))


def test_kidney_target_sentence() -> None:
    target = COMPARISONS["kidney-3d-vs-2d"].target
    good = [{"arm": "3d", "case": f"c{i}", "label": "kidney", "dice": "0.96", "volume_error_pct": "2.0"}
            for i in range(20)]
    assert "MET here" in target(good) and "20/20" in target(good)
    one_off = good[:19] + [{**good[0], "case": "c19", "volume_error_pct": "-6.0"}]
    assert "MET here" in target(one_off)  # 19/20 = 95 %
    two_off = one_off[:18] + [{**good[0], "case": "c18", "volume_error_pct": "7.5"}, one_off[19]]
    assert "NOT MET" in target(two_off) and "18/20" in target(two_off)
    low = [{**r, "dice": "0.94"} for r in good]
    assert "NOT MET" in target(low)
    biased = [{**r, "volume_error_pct": "3.5"} for r in good]  # every case under 5 %, all of them too large
    assert "NOT MET" in target(biased) and "mean signed volume error +3.5 %" in target(biased)
    assert "not measured" in target([{**r, "arm": "2d"} for r in good])


def test_table_of_several_labels_keeps_them_apart() -> None:
    rows = [{"arm": arm, "case": "ct_left", "label": label, "dice": str(d), "hd95_mm": hd,
             "volume_pred_ml": "1", "volume_true_ml": "1", "volume_error_pct": str(e)}
            for arm, label, d, hd, e in (("2d", "kidney", 0.8, "6.0", -10), ("3d", "kidney", 0.9, "3.0", 4),
                                         ("2d", "psoas", 0.5, "inf", -50), ("3d", "psoas", 0.6, "9.0", 20))]
    lines = markdown.markdown_table(rows, ["2d", "3d"]).splitlines()
    assert "HD95 mm 3d" in lines[0]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert cells["ct_left kidney"] == ["0.800", "0.900", "6.0", "3.0", "-10.0", "+4.0"]
    assert cells["ct_left psoas"][2:4] == ["inf", "9.0"]
    mean_psoas = next(v for k, v in cells.items() if k.startswith("**mean psoas**"))
    assert mean_psoas[:2] == ["0.500", "0.600"] and mean_psoas[4:] == ["50.0", "20.0"]
    assert next(v for k, v in cells.items() if "under 5 % volume error kidney" in k)[-2:] == ["0/1", "1/1"]
    text = markdown.verdicts(rows, "2d", "3d")
    assert text.startswith("kidney: ") and "\n\npsoas: " in text
