"""The search for the best INT8 model, and the accuracy guard with its float fallback.

The search quantizes with every candidate calibration (--calibration-method first, then, with the search
on, the others of SEARCH), each with its weights rounded to nearest and, with the search on, bias-corrected;
then the best calibration again on a larger calibration set, and the best candidate with its most sensitive
activation tensors given another percentile range. Every candidate is judged on the selection split (training images no
calibration saw): highest agreement with FP32 first, then accuracy. The best that reaches --min-agreement
there is checked alone on the test set against the guard (--max-accuracy-drop and --min-agreement); when
it misses, the worst-quantized activation tensors (sensitivity_ranking) are kept in float, 1, 2, 4, ...
of them, until the guard holds. No torch here: quantization and its checks run on ONNX Runtime alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.core.config import QuantizationConfig
from resnet_edge.core.errors import UserError
from resnet_edge.export.calibration import (
    DEFAULT_PERCENTILE,
    Calibration,
    activation_ranges,
    calibration_images,
    selection_split,
)
from resnet_edge.export.sensitivity import nodes_touching, sensitivity_ranking
from resnet_edge.export.weights import _quantize, bias_correction, rounded_models
from resnet_edge.inference.runtime import EvalResult, create_session, evaluate_session

log = logging.getLogger(__name__)

Bar = Callable[[str, int], Callable[[int], None] | None]  # progress(description, total) -> callback or None


class AccuracyGuardError(UserError):
    """INT8 loses more accuracy than allowed even with layers kept in float."""


# The search's candidates after the one --calibration-method names (tried first): the ranges of every
# activation tensor from its whole calibration range (minmax), and histogram percentiles that clip the
# rarest values (ONNX Runtime's calibrators). Entropy (the KL-divergence threshold of TensorRT's calibration)
# is not among them: its threshold search (pure Python over 2048 bins per tensor) made resnet8's export
# take 32-36 s against 11-12 s for minmax (benchmarks/int8_quality.py, 2-core AMD EPYC);
# --calibration-method entropy tries it.
SEARCH = (
    Calibration("minmax"),
    Calibration("percentile", 99.999),
    Calibration("percentile", 99.99),
    Calibration("percentile", 99.9),
)
SENSITIVE_TENSORS = 3  # the refinement gives this many of the worst-quantized tensors another range
# The percentile the refinement gives the sensitive tensors, by the best candidate's percentile (None:
# minmax or entropy); any other percentile gets 99.99.
REFINEMENT_PERCENTILE = {None: 99.99, 99.999: 99.99, 99.99: 99.9, 99.9: 99.0}


def candidates(config: QuantizationConfig) -> list[Calibration]:
    """--calibration-method first, then (with the search on) the others of SEARCH."""
    first = Calibration(config.method, DEFAULT_PERCENTILE if config.method == "percentile" else None)
    return [first] + ([c for c in SEARCH if c != first] if config.search else [])


@dataclass
class GuardRound:
    """The guard round that held: its INT8 model, that model's test-set result, the nodes kept in float."""

    model: Path
    result: EvalResult
    float_nodes: list[str]


@dataclass
class Split:
    """Images a stage judges on, with the FP32 model's answers on them."""

    pixels: np.ndarray
    labels: np.ndarray | None
    fp32: EvalResult

    def judge(self, result: EvalResult) -> dict[str, float | None]:
        agreement = float((result.predictions == self.fp32.predictions).mean())
        drop = None if self.labels is None else 100 * (self.fp32.accuracy - result.accuracy)
        return {
            "accuracy": None if self.labels is None else result.accuracy,
            "drop_points": drop,
            "agreement": agreement,
        }


def _holds(judged: dict[str, float | None], config: QuantizationConfig) -> bool:
    """The guard: at most --max-accuracy-drop points lost (when labels tell) and --min-agreement reached."""
    drop, agreement = judged["drop_points"], judged["agreement"]
    drop_ok = drop is None or drop <= config.max_accuracy_drop + 1e-9
    return drop_ok and agreement is not None and 100 * agreement >= config.min_agreement - 1e-9


def _evaluate(path: Path, split: Split, progress: Callable[[int], None] | None = None) -> EvalResult:
    labels = split.labels if split.labels is not None else np.zeros(len(split.pixels), np.int64)
    return evaluate_session(create_session(path, "cpu"), split.pixels, labels, progress=progress)


def judging_splits(
    fp32_path: Path,
    train_images: np.ndarray,
    train_labels: np.ndarray | None,
    test_pixels: np.ndarray,
    test_labels: np.ndarray,
    config: QuantizationConfig,
    bar: Bar,
) -> tuple[Split, Split | None, np.ndarray | None]:
    """The test split with FP32's answers and, with the search on (one candidate needs no choosing), the
    selection split with FP32's answers and the images of the larger-calibration candidate."""
    fp32_session = create_session(fp32_path, "cpu")
    fp32 = evaluate_session(fp32_session, test_pixels, test_labels, progress=bar("evaluate FP32", len(test_pixels)))
    test = Split(test_pixels, test_labels, fp32)
    if not config.search:
        return test, None, None
    select_pixels, select_labels, more_calib = selection_split(train_images, train_labels, config)
    fp32_select = evaluate_session(
        fp32_session,
        select_pixels,
        select_labels if select_labels is not None else np.zeros(len(select_pixels), np.int64),
    )
    return test, Split(select_pixels, select_labels, fp32_select), more_calib


def _search(
    pre: Path,
    work: Path,
    calib: np.ndarray,
    select: Split | None,
    config: QuantizationConfig,
    bar: Bar,
    more_calib: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Quantize with every candidate calibration (no float layers), each with its weights rounded to nearest
    and (with the search on) bias-corrected, and judge each on the selection split; then the two candidates
    made from the best (_more_calibration, _refine_sensitive_tensors). The log, best first (highest
    agreement with FP32, then accuracy), each with its model, float model and ranges."""
    tried: list[dict[str, Any]] = []
    for i, calibration in enumerate(candidates(config)):
        t0 = time.perf_counter()
        ranges = activation_ranges(pre, calib, calibration, config.calibration_batch_size, work)
        progress = bar(f"calibrate {calibration.name}", len(calib))
        for method, model_pre, model in rounded_models(pre, work, i, calib, config, ranges, progress):
            row = _candidate(
                calibration.name, method, len(calib), _judged(model, select, bar), t0, f"{calibration.name}, {method}"
            )
            tried.append({**row, "_model": model, "_pre": model_pre, "_ranges": ranges, "_calibration": calibration})
    ranked = _rank(tried)
    if select is not None and more_calib is not None and len(more_calib):
        ranked = _more_calibration(ranked, pre, work, calib, more_calib, select, config, bar)
    if select is not None and len(ranked) > 1:
        ranked = _refine_sensitive_tensors(ranked, pre, work, calib, select, config, bar)
    return ranked


def _judged(model: Path, select: Split | None, bar: Bar) -> dict[str, float | None]:
    """``model`` judged on the selection split; nothing measured without one."""
    if select is None:
        return {"accuracy": None, "drop_points": None, "agreement": None}
    return select.judge(_evaluate(model, select, bar("select", len(select.pixels))))


def _candidate(
    calibration: str,
    weights: str,
    images: int,
    judged: dict[str, float | None],
    t0: float,
    logged_as: str,
    overridden: list[str] | None = None,
) -> dict[str, Any]:
    """A candidate's row of the search's log (export.json's fields), its seconds counted from ``t0``."""
    row: dict[str, Any] = {"calibration": calibration, "weights": weights, "float_nodes": 0}
    if overridden is not None:
        row["overridden_tensors"] = overridden
    row["calibration_images"] = images
    row.update({f"selection_{k}": v for k, v in judged.items()})
    row["seconds"] = time.perf_counter() - t0
    log.info("candidate %s: agreement %s, drop %s", logged_as, judged["agreement"], judged["drop_points"])
    return row


def _rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-(r["selection_agreement"] or 0.0), -(r["selection_accuracy"] or 0.0)))


def _more_calibration(
    ranked: list[dict[str, Any]],
    pre: Path,
    work: Path,
    calib: np.ndarray,
    more: np.ndarray,
    select: Split,
    config: QuantizationConfig,
    bar: Bar,
) -> list[dict[str, Any]]:
    """One more candidate: the best calibration again on a larger calibration set (the calibration images
    and up to as many more, none of them in the selection split), weights rounded to nearest."""
    t0 = time.perf_counter()
    calibration = ranked[0]["_calibration"]
    big = np.concatenate([calib, more])
    ranges = activation_ranges(pre, big, calibration, config.calibration_batch_size, work)
    path = work / "candidate-more-calibration.onnx"
    _quantize(pre, path, big, config, [], bar(f"calibrate on {len(big)}", len(big)), ranges)
    name = f"{calibration.name}, {len(big)} calibration images"
    row = _candidate(name, "nearest", len(big), _judged(path, select, bar), t0, name)
    row.update(_model=path, _pre=pre, _ranges=ranges, _calibration=calibration, _calib=big)
    return _rank([*ranked, row])


def _refine_sensitive_tensors(
    ranked: list[dict[str, Any]],
    pre: Path,
    work: Path,
    calib: np.ndarray,
    select: Split,
    config: QuantizationConfig,
    bar: Bar,
) -> list[dict[str, Any]]:
    """One more candidate: the best one with its SENSITIVE_TENSORS worst-quantized activation tensors (our
    SNR ranking on held-out images) given the range of REFINEMENT_PERCENTILE (per-tensor overrides, as
    NNCF's and INC's tuning do per layer), the other tensors as they were. Judged on the selection split
    like the rest."""
    t0 = time.perf_counter()
    best = ranked[0]
    alternative = Calibration("percentile", REFINEMENT_PERCENTILE.get(best["_calibration"].percentile, 99.99))
    own = best.get("_calib", calib)  # the calibration set of the candidate refined, for every range
    alt_ranges = activation_ranges(pre, own, alternative, config.calibration_batch_size, work) or {}
    probe = calibration_images(select.pixels, 128, config.seed + 3)  # held-out images, not the calibration set
    worst = [name for name, _ in sensitivity_ranking(best["_pre"], best["_model"], probe) if name in alt_ranges]
    if not worst:
        return ranked
    chosen = worst[:SENSITIVE_TENSORS]
    ranges = {**(best["_ranges"] or {}), **{name: alt_ranges[name] for name in chosen}}
    path = work / "candidate-sensitive.onnx"
    _quantize(best["_pre"], path, own, config, [], bar("calibrate sensitive tensors", len(own)), ranges)
    name = f"{best['calibration']}, {alternative.name} on {len(chosen)} sensitive tensors"
    row = _candidate(name, best["weights"], len(own), _judged(path, select, bar), t0, name, overridden=chosen)
    row.update(_model=path, _pre=best["_pre"], _ranges=ranges, _calibration=best["_calibration"], _calib=own)
    return _rank([*ranked, row])


def search_and_guard(
    pre: Path,
    work: Path,
    calib: np.ndarray,
    train_images: np.ndarray,
    select: Split | None,
    test: Split,
    config: QuantizationConfig,
    bar: Bar,
    more_calib: np.ndarray | None = None,
) -> tuple[GuardRound, list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The search for the best quantized model, then, only if it does not hold the guard, float fallback:
    the worst-quantized tensors (1, 2, 4, ... of them, by sensitivity_ranking) kept in float.

    The candidates are ranked on the selection split (held-out training images): the best whose agreement
    there reaches --min-agreement (else the best) is the search's model, and it alone is checked against
    the guard on the test set, the promise `export` makes: nothing is chosen among candidates by test
    images. Fallback starts from it, its rounds checked on the test set as the guard always was.
    Returns the round that holds, the rounds checked, the search's log and the chosen candidate."""
    tried = _search(pre, work, calib, select, config, bar, more_calib)
    best = _searched_model(tried, config)
    path, keep_float = best["_model"], 0
    exclude: list[str] = []
    checked: list[dict[str, Any]] = []
    ranking: list[tuple[str, float]] | None = None
    while True:
        int8, check = _check_on_test(path, test, best, exclude, config, bar)
        checked.append(check)
        if not exclude:
            best.update(
                test_accuracy=int8.accuracy,
                test_drop_points=check["drop_points"],
                test_agreement=check["agreement"],
                holds=check["holds"],
            )
        if check["holds"]:
            best["chosen"] = True
            return GuardRound(path, int8, exclude), checked, _public(tried), best
        if ranking is None:
            ranking = sensitivity_ranking(best["_pre"], path, calibration_images(train_images, 128, config.seed + 1))
        keep_float = max(1, 2 * keep_float)
        if keep_float >= len(ranking):  # every quantized tensor in float: no INT8 model worth the name
            break
        exclude = nodes_touching(best["_pre"], [name for name, _ in ranking[:keep_float]])
        path = _fallback_model(best, pre, work, calib, config, exclude, keep_float, bar)
    raise _guard_error(pre, checked, test, config, len(tried), len(exclude))


def _searched_model(tried: list[dict[str, Any]], config: QuantizationConfig) -> dict[str, Any]:
    """The search's model: the best candidate whose agreement on the selection split reaches
    --min-agreement (every candidate when there was no selection split), else the best."""
    eligible = [
        r
        for r in tried
        if r["selection_agreement"] is None or 100 * r["selection_agreement"] >= config.min_agreement - 1e-9
    ]
    return (eligible or tried)[0]


def _check_on_test(
    path: Path, test: Split, best: dict[str, Any], exclude: list[str], config: QuantizationConfig, bar: Bar
) -> tuple[EvalResult, dict[str, Any]]:
    """One guard round: the INT8 model at ``path`` (``best`` with the nodes ``exclude`` kept in float) judged
    on the test set; its result and its row of guard_rounds."""
    int8 = _evaluate(path, test, bar("evaluate INT8", len(test.pixels)))
    on_test = test.judge(int8)
    log.info(
        "INT8 with %d nodes in float: accuracy %.4f, agreement %.4f", len(exclude), int8.accuracy, on_test["agreement"]
    )
    return int8, {
        "calibration": best["calibration"],
        "weights": best["weights"],
        "float_nodes": list(exclude),
        "int8_accuracy": int8.accuracy,
        "drop_points": on_test["drop_points"],
        "agreement": on_test["agreement"],
        "holds": _holds(on_test, config),
    }


def _fallback_model(
    best: dict[str, Any],
    pre: Path,
    work: Path,
    calib: np.ndarray,
    config: QuantizationConfig,
    exclude: list[str],
    keep_float: int,
    bar: Bar,
) -> Path:
    """``best`` quantized again with the nodes ``exclude`` kept in float (same ranges, same calibration set)."""
    path = work / f"int8-float-{keep_float}.onnx"
    own = best.get("_calib", calib)
    if best["weights"] == "bias correction":
        # the layers kept in float keep their float weights, so they must keep their own biases too:
        # quantize the plain model, then correct only the layers that were quantized (those with int8
        # weights), then quantize that with the same float layers and ranges
        plain, corrected = work / f"int8-float-{keep_float}-plain.onnx", work / f"pre-float-{keep_float}.onnx"
        _quantize(pre, plain, own, config, exclude, None, best["_ranges"])
        bias_correction(pre, plain, own, corrected)
        _quantize(corrected, path, own, config, exclude, bar("calibrate", len(own)), best["_ranges"])
    else:
        _quantize(best["_pre"], path, own, config, exclude, bar("calibrate", len(own)), best["_ranges"])
    return path


def _guard_error(
    pre: Path, checked: list[dict[str, Any]], test: Split, config: QuantizationConfig, tried: int, kept: int
) -> AccuracyGuardError:
    """No round held the guard: the closest one, the guard and what was tried, in one message."""
    import onnx

    graph_nodes = len(onnx.load(str(pre)).graph.node)
    closest = max(checked, key=lambda r: r["agreement"])
    return AccuracyGuardError(
        f"INT8 loses {closest['drop_points']:.2f} points of test accuracy ({100 * test.fp32.accuracy:.2f} % -> "
        f"{100 * closest['int8_accuracy']:.2f} %) and agrees with FP32 on {100 * closest['agreement']:.2f} % of the "
        f"test images at best, against --max-accuracy-drop {config.max_accuracy_drop:g} and --min-agreement "
        f"{config.min_agreement:g}; the search ({tried} candidates) and keeping up to "
        f"{kept} of {graph_nodes} nodes in float did not bring it within the guard; no INT8 model was "
        "written (try --calibration-size, or a looser guard)"
    )


def _public(tried: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The search's log as export.json keeps it (no paths or ranges)."""
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in tried]
