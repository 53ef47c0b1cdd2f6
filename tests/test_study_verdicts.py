"""``python -m zoo.study verdicts``: every claim's arms build, a claim's study runs (fake trainer)
and its pairs come out with verdicts recomputed here from the study JSON, Holm across the whole
table as statsmodels computes it, a missing study reported as not run, a bad claim refused."""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics

import numpy as np
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint
from study_fakes import fake_floors, fake_run

from zoo.study import sweep, verdicts
from zoo.study.claims import BY_NAME, CLAIMS
from zoo.study.statistics import Comparison, min_detectable_difference, verdict, welch
from zoo.study.table import TrialRow


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.name)
def test_every_arm_of_every_claim_builds(claim):
    labels = [a.label for a in sweep.parse(["--arms", ",".join(claim.arms), "--baseline", claim.reference])[1].arms]
    assert labels == list(claim.arms)  # the claim's strings are the sweep's own labels
    assert claim.reference in claim.arms and len(claim.pairs) >= 1
    for pair in claim.pairs:
        assert pair.arm in claim.arms and pair.versus in claim.arms and pair.arm != pair.versus
        assert (pair.measure, pair.claim) in {("error", "lower"), ("spread", "lower"), ("robustness", "higher")}
    _, plan = sweep.parse(["--arms", ",".join(claim.arms), "--baseline", claim.reference, "--data", "digits"])
    params = sweep.check(plan)
    assert sorted(params) == sorted(claim.arms) and all(n > 0 for n in params.values())


def quietly(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = verdicts.main(argv, train_fn=fake_run, floors_fn=fake_floors)
    return rc, out.getvalue(), err.getvalue()


def finals_of(data, arm):
    seen = {}
    for t in data["trials"]:
        if t["arm"] == arm and t["kind"] == "final" and t["state"] == "complete":
            seen.setdefault(t["slot"], t["value"])
    return [seen[s] for s in sorted(seen)]


def test_a_claim_runs_as_a_study_and_its_verdict_follows_from_its_json(tmp_path):
    budget = ["--space", "none", "--epochs", "2", "--seeds", "3", "--data", "digits", "--poll", "0.1"]
    budget += ["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--set", "data.num_workers=0"]
    rc, _, err = quietly(["--claims", "l1_norm", *budget])
    assert rc == 0, err
    study = json.loads((tmp_path / "results" / "verdict_l1_norm.json").read_text())
    assert study["design"]["arms"] == list(BY_NAME["l1_norm"].arms)
    table = json.loads((tmp_path / "results" / "verdicts.json").read_text())
    rows = table["rows"]
    assert [(r["claim"], r["pair"], r["measure"]) for r in rows] == [
        ("l1_norm", f"{p.arm} vs {p.versus}", p.measure) for p in BY_NAME["l1_norm"].pairs
    ]
    l1, l2 = (finals_of(study, a) for a in ("zoo_cct_mini_32:adamw:norm=l1_layernorm", "zoo_cct_mini_32:adamw"))
    assert len(l1) == len(l2) == 3
    error, spread = rows
    m = 2
    w = welch(l1, l2)
    assert error["p"] == pytest.approx(scipy.stats.ttest_ind(l1, l2, equal_var=False).pvalue)
    assert [error["p_holm"], spread["p_holm"]] == pytest.approx(
        multipletests([error["p"], spread["p"]], method="holm")[1]
    )
    half_bonf = welch(l1, l2, 1 - 0.05 / m).half
    mdd = min_detectable_difference(statistics.stdev(l1), statistics.stdev(l2), 3, 3, alpha=0.05 / m)
    expected = verdict(Comparison(w.diff, w.half, half_bonf, w.p, error["p_holm"], m=m), mdd, claim="lower")
    assert error["verdict"] == expected and error["mdd"] == pytest.approx(mdd)
    assert error["ci_bonferroni_hi"] - error["ci_bonferroni_lo"] == pytest.approx(2 * half_bonf)
    assert spread["difference"] == pytest.approx(np.std(l1, ddof=1) / np.std(l2, ddof=1))
    assert "| l1_norm |" in (tmp_path / "results" / "verdicts.md").read_text()


def study_json(path, claim, finals, robust=None):
    """A study JSON as the sweep writes it (the fields the verdicts read), from given finals."""
    trials = [
        vars(TrialRow(arm=arm, kind="final", rung=None, slot=i, state="complete", value=float(v)))
        for arm, values in finals.items()
        for i, v in enumerate(values)
    ]
    robust = robust or {}
    rows = [
        {"arm": a, "complete": True, "robust_k": robust.get(a, (0, 0))[0], "robust_n": robust.get(a, (0, 0))[1]}
        for a in claim.arms
    ]
    path.write_text(json.dumps({"design": {"arms": list(claim.arms)}, "bar": 9.0, "trials": trials, "rows": rows}))


def test_holm_is_across_the_table_and_a_missing_study_is_listed(tmp_path):
    rng = np.random.default_rng(3)
    rsb, l1, shampoo = BY_NAME["rsb"], BY_NAME["l1_norm"], BY_NAME["shampoo"]
    finals = {
        "rsb": {rsb.arms[0]: rng.normal(10, 1, 5), rsb.arms[1]: rng.normal(8, 1, 5)},
        "l1_norm": {l1.arms[0]: rng.normal(10, 0.3, 5), l1.arms[1]: rng.normal(10.4, 1.5, 5)},
    }
    for claim in (rsb, l1):
        study_json(tmp_path / f"verdict_{claim.name}.json", claim, finals[claim.name])
    robust = {shampoo.arms[0]: (3, 9), shampoo.arms[1]: (8, 9), shampoo.arms[2]: (1, 9)}
    study_json(tmp_path / "verdict_shampoo.json", shampoo, {a: [5.0, 6.0] for a in shampoo.arms}, robust)
    argv = ["--report-only", "--claims", "rsb,l1_norm,shampoo,widenet", "--results", str(tmp_path), "--seeds", "5"]
    rc, _, err = quietly(argv)
    assert rc == 0, err
    rows = json.loads((tmp_path / "verdicts.json").read_text())["rows"]
    done = [r for r in rows if r["status"] == "done"]
    assert [r["claim"] for r in done] == ["rsb", "l1_norm", "l1_norm", "shampoo", "shampoo"]
    # the raw p-values, recomputed here with scipy, Holm-adjusted by statsmodels over all five
    resnet, cct = finals["rsb"][rsb.arms[1]], finals["rsb"][rsb.arms[0]]
    norm_l1, norm_l2 = finals["l1_norm"][l1.arms[1]], finals["l1_norm"][l1.arms[0]]
    raw = [
        scipy.stats.ttest_ind(resnet, cct, equal_var=False).pvalue,
        scipy.stats.ttest_ind(norm_l1, norm_l2, equal_var=False).pvalue,
        done[2]["p"],  # the F test: checked through the adjustment only
        scipy.stats.fisher_exact([[8, 1], [1, 8]]).pvalue,
        scipy.stats.fisher_exact([[8, 1], [3, 6]]).pvalue,
    ]
    assert [r["p"] for r in done] == pytest.approx(raw)
    assert [r["p_holm"] for r in done] == pytest.approx(multipletests(raw, method="holm")[1])
    assert all(r["m"] == 5 for r in done)
    assert done[3]["difference"] == pytest.approx(8 / 9 - 1 / 9)
    wilson = proportion_confint(8, 9, alpha=0.05, method="wilson")
    assert (done[3]["arm_ci95_lo"], done[3]["arm_ci95_hi"]) == pytest.approx(wilson)
    # the error rows' verdicts, recomputed at the table's level
    for row, (a, b) in zip([done[0], done[1]], [(resnet, cct), (norm_l1, norm_l2)]):
        w = welch(list(a), list(b))
        half = welch(list(a), list(b), 1 - 0.05 / 5).half
        mdd = min_detectable_difference(np.std(a, ddof=1), np.std(b, ddof=1), 5, 5, alpha=0.05 / 5)
        assert row["mdd"] == pytest.approx(mdd)
        assert row["verdict"] == verdict(Comparison(w.diff, w.half, half, w.p, row["p_holm"], m=5), mdd)
    assert all(r["verdict"] in ("supported", "contradicted", "not resolved at this power") for r in done)
    missing = [r for r in rows if r["claim"] == "widenet"]
    assert len(missing) == len(BY_NAME["widenet"].pairs)
    assert all(r["status"] == "not run yet" and "--claims widenet" in r["command"] for r in missing)
    assert "--report-only" not in missing[0]["command"] and "--seeds 5" in missing[0]["command"]
    md = (tmp_path / "verdicts.md").read_text()
    assert "not run yet: `python -m zoo.study verdicts --claims widenet" in md
    assert not math.isnan(done[0]["ci_bonferroni_lo"])


def test_an_incomplete_study_is_not_run_yet(tmp_path):
    rsb = BY_NAME["rsb"]
    study_json(tmp_path / "verdict_rsb.json", rsb, {rsb.arms[0]: [1.0, 2.0], rsb.arms[1]: [1.0, 2.0]})
    data = json.loads((tmp_path / "verdict_rsb.json").read_text())
    data["rows"][0]["complete"] = False
    (tmp_path / "verdict_rsb.json").write_text(json.dumps(data))
    rc, _, err = quietly(["--report-only", "--claims", "rsb", "--results", str(tmp_path)])
    assert rc == 0, err
    rows = json.loads((tmp_path / "verdicts.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["not run yet"]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for argv in (["--claims", "rbs"], ["--study", "x"], ["--claims", ","]):
        rc, out, err = quietly([*argv, "--results", str(tmp_path)])
        assert rc == 2 and err.count("\n") == 1, (argv, err)
    assert "did you mean 'rsb'" in quietly(["--claims", "rbs"])[2]
    assert not list(tmp_path.iterdir())  # refused before anything is written
    rc, out, _ = quietly(["--list"])
    assert rc == 0 and all(f"{c.name}:" in out for c in CLAIMS)
