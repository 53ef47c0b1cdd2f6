"""Floors for a study table: what "learned something" means on a dataset.

Two floors, on the same splits and at the same resolution as the arms:

* the majority class of the training split, predicted for every image (its balanced error is
  100 % - 100 % / classes: it names one class);
* a multinomial logistic regression on the raw pixels (scikit-learn's ``LogisticRegression``),
  the linear model an arm must beat to have learned features. Its inverse regularisation C is
  chosen on the holdout carved from the training images exactly as a tuning trial's (zoo.data's
  ``create_dataset`` with ``data.holdout``), then it is refit on the whole training split and
  scored on the dataset's own validation split, as a study's finals are.

Images go through zoo.data's eval transform at ``img_size`` with the whole image kept
(``crop_pct`` 1) and no normalisation, so pixels are in [0, 1]; grey images (three equal
channels, as mnist5k, digits and elpv are served) give one feature a pixel, colour images three.
Nothing is cached on disk: a study stores the returned ``Floors`` in its results JSON.

CLI: ``python -m zoo.study.floors --data mnist5k --img-size 32`` prints the floors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from zoo.data import AugmentConfig, DataConfig, Subset, create_dataset, create_transform
from zoo.study.statistics import balanced_accuracy, per_class_recall

# a decade grid around scikit-learn's default C = 1: pixels in [0, 1] need no finer search for a floor
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0)
METRICS = ("error", "balanced_error")


@dataclass(frozen=True)
class Floors:
    """Both floors in percent error on the validation split (``*_balanced_err``: 100 % minus the
    balanced accuracy), with what they were computed from."""

    data: str
    img_size: int
    holdout: float
    seed: int
    classes: tuple[str, ...]
    n_train: int
    n_val: int
    majority_class: str
    majority_err: float
    majority_balanced_err: float
    logreg_err: float
    logreg_balanced_err: float
    logreg_C: float
    logreg_per_class_recall: tuple[float, ...]
    holdout_metric: str  # what chose C: "error" or "balanced_error"
    holdout_errs: tuple[tuple[float, float], ...]  # (C, holdout error %) for every C tried
    converged: bool  # every fit converged within max_iter
    C_on_edge: bool  # the chosen C is the grid's smallest or largest: a wider grid may lower the floor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _pixels(ds) -> tuple[np.ndarray, np.ndarray]:
    """(N, features) float32 pixels in [0, 1] and (N,) labels of a dataset built with the floor transform."""
    x = np.stack([ds[i][0].numpy() for i in range(len(ds))])  # (N, 3, H, W)
    if np.array_equal(x[:, :1], x[:, 1:2]) and np.array_equal(x[:, :1], x[:, 2:3]):
        x = x[:, :1]  # grey served as RGB: (N, 3, H, W) -> (N, 1, H, W)
    return x.reshape(len(x), -1), np.asarray(ds.targets, dtype=np.int64)  # (N, C, H, W) -> (N, C*H*W)


def _errors(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> tuple[float, float, list[float]]:
    """(error %, balanced error %, per-class recall) of predictions over k classes."""
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    return (
        100.0 * float(np.mean(y_true != y_pred)),
        100.0 * (1.0 - balanced_accuracy(confusion)),
        per_class_recall(confusion),
    )


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded in Floors.converged instead
        model = LogisticRegression(C=c, max_iter=max_iter).fit(x, y)
    return model, bool(np.all(model.n_iter_ < max_iter))


def floors(
    data: str,
    img_size: int,
    holdout: float,
    seed: int,
    *,
    max_iter: int = 1000,
    Cs: tuple[float, ...] = DEFAULT_CS,
    metric: str = "error",
    val_fraction: float = DataConfig.val_fraction,
) -> Floors:
    """The majority and logistic-regression floors of ``data`` (as ``--data`` names it: mnist5k,
    digits, elpv, an image folder) at ``img_size``; ``holdout`` and ``seed`` are the study's
    ``data.holdout`` and ``data.split_seed`` (``val_fraction`` its ``data.val_fraction``, which
    splits digits and image folders without a val folder); ``metric`` is the study's tuning metric, which
    chooses C on the holdout (ties: the smaller C, more regularised). Raises ValueError /
    FileNotFoundError with a one-line message on bad input, before anything is fitted."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout: must be in (0, 1) (C is chosen on it), got {holdout!r}")
    if img_size < 1:
        raise ValueError(f"img_size: must be >= 1, got {img_size!r}")
    if metric not in METRICS:
        raise ValueError(f"metric: must be one of {', '.join(METRICS)}, got {metric!r}")
    if not Cs or any(c <= 0 for c in Cs):
        raise ValueError(f"Cs: must be positive numbers, got {Cs!r}")
    transform = create_transform(
        AugmentConfig(img_size=img_size, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), is_training=False
    )
    whole = DataConfig(dataset=data, split_seed=seed, val_fraction=val_fraction)
    train, val = create_dataset(whole, "train", transform), create_dataset(whole, "val", transform)
    # the trainer's holdout split: indices into the same training images
    carved = dataclasses.replace(whole, holdout=holdout)
    fit_part, held_part = (create_dataset(carved, split, None) for split in ("train", "val"))
    assert isinstance(fit_part, Subset) and isinstance(held_part, Subset)
    x_train, y_train = _pixels(train)
    x_val, y_val = _pixels(val)
    k = len(train.classes)

    majority = int(np.argmax(np.bincount(y_train, minlength=k)))
    major_err, major_bal, _ = _errors(y_val, np.full_like(y_val, majority), k)

    pick = 0 if metric == "error" else 1
    holdout_errs, converged = [], True
    for c in sorted(Cs):
        model, ok = _fit(x_train[fit_part.indices], y_train[fit_part.indices], c, max_iter)
        held = held_part.indices
        holdout_errs.append((c, _errors(y_train[held], model.predict(x_train[held]), k)[pick]))
        converged &= ok
    best_c = min(holdout_errs, key=lambda ce: ce[1])[0]  # first of the lowest: the smaller C
    model, ok = _fit(x_train, y_train, best_c, max_iter)
    err, bal, recall = _errors(y_val, model.predict(x_val), k)
    return Floors(
        data=data,
        img_size=img_size,
        holdout=holdout,
        seed=seed,
        classes=tuple(train.classes),
        n_train=len(y_train),
        n_val=len(y_val),
        majority_class=train.classes[majority],
        majority_err=major_err,
        majority_balanced_err=major_bal,
        logreg_err=err,
        logreg_balanced_err=bal,
        logreg_C=best_c,
        logreg_per_class_recall=tuple(recall),
        holdout_metric=metric,
        holdout_errs=tuple(holdout_errs),
        converged=converged and ok,
        C_on_edge=len(Cs) > 1 and best_c in (min(Cs), max(Cs)),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo.study.floors", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, elpv, or an image folder")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--holdout", type=float, default=0.2, help="share of the training images C is chosen on")
    p.add_argument("--seed", type=int, default=0, help="data.split_seed")
    p.add_argument("--metric", default="error", choices=METRICS, help="what chooses C on the holdout")
    p.add_argument("--json", action="store_true", help="print the floors as JSON")
    args = p.parse_args(argv)
    try:
        f = floors(args.data, args.img_size, args.holdout, args.seed, metric=args.metric)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(f.to_dict(), indent=2))
        return 0
    print(f"{f.data} at {f.img_size}x{f.img_size}: {f.n_train} train / {f.n_val} val images, validation split")
    print(
        f"majority class {f.majority_class!r}: error {f.majority_err:.2f} %, "
        f"balanced error {f.majority_balanced_err:.2f} %"
    )
    print(
        f"logistic regression on pixels (C={f.logreg_C:g}, chosen on a {f.holdout:g} holdout by {f.holdout_metric}): "
        f"error {f.logreg_err:.2f} %, balanced error {f.logreg_balanced_err:.2f} %"
        + ("" if f.converged else " (some fits did not converge)")
        + (" (C at the edge of the grid)" if f.C_on_edge else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
