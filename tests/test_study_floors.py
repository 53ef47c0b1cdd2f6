"""zoo.study.floors at toy size: the majority floor counted by hand, the logistic floor against
scikit-learn fitted here on arrays built here, bad input in one line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from zoo.data.datasets import _stratified_split
from zoo.study.floors import floors, main

CS = (0.01, 0.1, 1.0)


def _reference_logreg(x_train, y_train, x_val, y_val, holdout, seed):
    """The floor's recipe written out: C by holdout error on a stratified share of the training
    split (the trainer's own split function), refit on all of it, error % on val."""
    fit, held = _stratified_split(y_train, holdout, seed)
    scored = []
    for c in CS:
        m = LogisticRegression(C=c, max_iter=500).fit(x_train[fit], y_train[fit])
        scored.append((np.mean(m.predict(x_train[held]) != y_train[held]), c))
    best = min(scored)[1]  # lowest error, then the smaller C
    m = LogisticRegression(C=best, max_iter=500).fit(x_train, y_train)
    return best, 100.0 * np.mean(m.predict(x_val) != y_val)


def _hand_majority(train_labels, val_labels) -> tuple[object, float]:
    top, _ = Counter(train_labels).most_common(1)[0]
    wrong = sum(1 for y in val_labels if y != top)
    return top, 100.0 * wrong / len(val_labels)


def test_digits_floors_against_sklearn_and_a_hand_count():
    from sklearn.datasets import load_digits

    f = floors("digits", 8, 0.2, 0, Cs=CS, max_iter=500)
    d = load_digits()
    # the zoo serves digits as uint8 0-255 (values 0-16 scaled); the floor sees them / 255 at 8x8
    pixels = np.round(d.images * (255.0 / 16.0)).reshape(len(d.images), -1) / 255.0
    train, val = _stratified_split(d.target, 0.1, 0)  # digits' own split: val_fraction 0.1, seed 0
    best_c, err = _reference_logreg(pixels[train], d.target[train], pixels[val], d.target[val], 0.2, 0)
    assert f.logreg_C == best_c
    assert f.logreg_err == pytest.approx(err)
    assert [c for c, _ in f.holdout_errs] == list(CS)
    top, major_err = _hand_majority(list(d.target[train]), list(d.target[val]))
    assert f.majority_class == str(top) and f.majority_err == pytest.approx(major_err)
    assert f.majority_balanced_err == pytest.approx(90.0)  # one class of ten recalled
    assert (f.n_train, f.n_val) == (len(train), len(val))
    assert f.logreg_err < f.majority_err
    assert f.C_on_edge == (best_c in (min(CS), max(CS)))
    json.dumps(f.to_dict())  # what a study stores


COLOURS = {"amber": (200, 120, 20), "blue": (20, 60, 200), "green": (30, 180, 60)}


def _write_folder(root: Path, counts: dict[str, dict[str, int]]) -> dict[str, list[tuple[np.ndarray, int]]]:
    """root/<split>/<class>/<i>.png: 12x12 colour images made of 2x2 blocks (so area averaging to
    6x6 is exact), noisy around each class's colour. Returns the 6x6 pixels / 255 and labels, in
    the zoo's order (class folders, then files, sorted)."""
    rng = np.random.default_rng(0)
    out: dict[str, list[tuple[np.ndarray, int]]] = {}
    for split, per_class in counts.items():
        out[split] = []
        for label, name in enumerate(sorted(per_class)):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class[name]):
                small = np.clip(rng.normal(COLOURS[name], 60, (6, 6, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(np.kron(small, np.ones((2, 2, 1), np.uint8))).save(root / split / name / f"{i:02d}.png")
                out[split].append((small.reshape(-1) / 255.0, label))
    return out


def test_image_folder_floors_rgb(tmp_path):
    counts = {
        "train": {"amber": 9, "blue": 5, "green": 4},
        "val": {"amber": 2, "blue": 3, "green": 3},
    }
    arrays = _write_folder(tmp_path, counts)
    f = floors(str(tmp_path), 6, 0.3, 0, Cs=CS, max_iter=500)
    x_train = np.stack([x for x, _ in arrays["train"]])
    y_train = np.array([y for _, y in arrays["train"]])
    x_val = np.stack([x for x, _ in arrays["val"]])
    y_val = np.array([y for _, y in arrays["val"]])
    best_c, err = _reference_logreg(x_train, y_train, x_val, y_val, 0.3, 0)
    assert f.logreg_C == best_c and f.logreg_err == pytest.approx(err)
    # by hand: "amber" has the most training images (9); 6 of the 8 validation images are not amber
    assert f.majority_class == "amber"
    assert f.majority_err == pytest.approx(100.0 * 6 / 8)
    assert f.majority_balanced_err == pytest.approx(100.0 - 100.0 / 3)
    assert f.classes == ("amber", "blue", "green")


def test_balanced_metric_reports_balanced_holdout_errors(tmp_path):
    _write_folder(tmp_path, {"train": {"amber": 9, "blue": 5, "green": 4}, "val": {"amber": 2, "blue": 2, "green": 2}})
    f = floors(str(tmp_path), 6, 0.3, 0, Cs=(0.01,), metric="balanced_error")
    # C = 0.01 is regularised enough to predict amber everywhere on the holdout: balanced error 2/3
    assert f.holdout_metric == "balanced_error"
    assert f.holdout_errs[0][1] == pytest.approx(100.0 - 100.0 / 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"data": "no-such-dataset"}, "no-such-dataset"),
        ({"holdout": 0.0}, "holdout"),
        ({"metric": "top5"}, "metric"),
        ({"Cs": (0.0,)}, "Cs"),
    ],
)
def test_bad_input_is_one_line(kwargs, match):
    args = {"data": "digits", "img_size": 8, "holdout": 0.2, "seed": 0, **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        floors(**args)
    assert "\n" not in str(err.value)


def test_cli(capsys):
    assert main(["--data", "no-such-dataset"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-dataset" in err
    assert main(["--data", "digits", "--img-size", "8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"] == "digits" and printed["logreg_err"] < printed["majority_err"]
