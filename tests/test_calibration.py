"""Decision thresholds from good images only: the order statistic, its intervals, storage in the model,
and the commands that set and use it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _deploy import make_images, tiny_model
from scipy import stats
from test_workflow import make_mvtec, run_cli, write_config

from patchcore import PatchCore
from patchcore.app.calibrate import split_calibration
from patchcore.data import ObjectData, Sample
from patchcore.deploy.calibration import (
    CalibrationError,
    calibrate,
    calibration_from_scores,
    normalize_score,
)
from patchcore.deploy.inference import Predictor
from patchcore.engine.persistence import state_digest as _state_digest


def _record(scores, rate):
    scores = np.asarray(scores, dtype=np.float64)
    return calibration_from_scores(scores, scores + 1.0, scores - 1.0, rate)


def test_threshold_is_the_conformal_order_statistic_of_good_scores():
    scores = np.random.default_rng(0).permutation(np.arange(1, 200, dtype=np.float64))  # 199 images
    record = _record(scores, 0.01)
    # k = ceil(200 * 0.99) = 198: the second largest of 1..199.
    assert record.order_statistic == 198
    assert record.image_threshold == 198.0
    assert record.pixel_threshold == 199.0  # same rule on the map maxima (scores + 1)
    assert record.certified is True
    assert record.false_alarm_rate_expected == pytest.approx(2 / 200)


def test_false_alarm_rate_interval_is_the_beta_law_of_the_order_statistic():
    record = _record(np.arange(100.0), 0.05)
    n, k = 100, math.ceil(101 * 0.95)
    assert record.order_statistic == k
    low, high = record.false_alarm_rate_ci95
    assert low == pytest.approx(stats.beta.ppf(0.025, n + 1 - k, k))
    assert high == pytest.approx(stats.beta.ppf(0.975, n + 1 - k, k))
    assert low < 0.05 < high


def test_both_intervals_have_their_95_percent_coverage_and_no_more_width_than_needed():
    """The two 95 % intervals, checked against oracles computed here: the threshold interval's order
    statistics from the binomial law's cumulative sums (scipy), and both intervals' coverage by simulation
    on uniform scores (where the true 0.95-quantile is 0.95 and the achieved false-alarm rate at a threshold
    t is 1 - t). Catches: an unbounded interval ((-inf, inf) passes `lo <= t <= hi`), an off-by-one order
    statistic, a one-sided or mis-centred interval, and the rate interval taken from the wrong Beta law."""
    n, rate = 100, 0.05
    q = 1 - rate
    cdf = stats.binom.cdf(np.arange(n + 1), n, q)  # cdf[j] = P(B <= j), B ~ Binomial(n, q)
    # Lower order statistic l: the largest with P(B < l) <= 2.5 %; upper u: the smallest with P(B >= u) <= 2.5 %.
    lower = max(j for j in range(1, n + 1) if cdf[j - 1] <= 0.025)
    upper = min(j for j in range(1, n + 1) if 1 - cdf[j - 1] <= 0.025)
    values = np.sort(np.random.default_rng(3).random(n))
    record = _record(values, rate)
    assert record.image_threshold_ci95 == (values[lower - 1], values[upper - 1])
    assert cdf[upper - 1] - cdf[lower - 1] >= 0.95  # P(l <= B < u): the coverage it promises

    rng = np.random.default_rng(4)
    rounds = 4000
    threshold_hits = rate_hits = 0
    for _ in range(rounds):
        record = _record(rng.random(n), rate)
        lo_t, hi_t = record.image_threshold_ci95
        threshold_hits += lo_t <= q <= hi_t
        lo_r, hi_r = record.false_alarm_rate_ci95
        rate_hits += lo_r <= 1 - record.image_threshold <= hi_r
    # Binomial standard error at 95 % over 4000 rounds: 0.0034; 4 of them either side.
    assert 0.95 - 0.014 <= rate_hits / rounds <= 0.95 + 0.014  # exact law: coverage 95 %
    assert 0.95 - 0.014 <= threshold_hits / rounds <= 0.985  # conservative (discrete), never far above


def test_new_good_images_exceed_the_threshold_at_most_at_the_chosen_rate_on_average():
    # The guarantee is distribution-free: check it on a skewed law, averaged over many calibrations.
    rng = np.random.default_rng(1)
    rate, n, rounds = 0.05, 59, 2000
    exceed = []
    for _ in range(rounds):
        threshold = _record(rng.lognormal(size=n), rate).image_threshold
        exceed.append(np.mean(rng.lognormal(size=400) > threshold))
    # Expected (n + 1 - k) / (n + 1) = 3/60 = 0.05; standard error ~ 0.028 / sqrt(2000) per round.
    assert np.mean(exceed) == pytest.approx(3 / 60, abs=0.004)


def test_too_few_images_for_the_rate_use_the_largest_score_and_say_it_is_not_certified():
    record = _record([1.0, 3.0, 2.0], 0.01)
    assert record.image_threshold == 3.0
    assert record.certified is False
    assert record.image_threshold_ci95 is None


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 2.0])
def test_a_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(CalibrationError, match="false-alarm rate"):
        _record([1.0, 2.0], rate)


def test_normalisation_puts_the_threshold_at_one_half():
    assert normalize_score(5.0, low=1.0, threshold=5.0) == 0.5
    assert normalize_score(1.0, low=1.0, threshold=5.0) == 0.0
    assert normalize_score(100.0, low=1.0, threshold=5.0) == 1.0
    assert normalize_score(3.0, low=1.0, threshold=5.0) == 0.25


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def model(images, single_torch_thread):
    return tiny_model(images)


def test_calibrated_predictor_decides_with_the_good_image_threshold(model, images):
    record = calibrate(Predictor(model), images["calib"], 0.1, source="calib")
    model.calibration_ = record
    predictor = Predictor(model)
    good = predictor.predict(images["good"])
    bad = predictor.predict(images["bad"])
    assert all(r.threshold == record.image_threshold for r in good + bad)
    assert all(r.anomalous is (r.score > record.image_threshold) for r in good + bad)
    assert all(r.anomalous for r in bad)
    for r in good + bad:
        assert r.normalized_score == pytest.approx(
            normalize_score(r.score, record.score_low, record.image_threshold)
        )
        assert r.mask.shape == r.original_size and r.mask.dtype == bool
    # The bright square is masked; the masks of good images are (nearly) empty.
    assert all(r.mask[14:30, 14:30].mean() > 0.5 for r in bad)
    assert np.mean([r.mask.mean() for r in good]) < 0.05
    model.calibration_ = None


def test_calibrate_command_stores_the_threshold_in_the_model_and_predict_uses_it(model, images, tmp_path):
    path = model.save(tmp_path / "patchcore_tiny.pt")
    code, out, err = run_cli("predict", "-m", path, images["good"][0], "-o", tmp_path / "before")
    assert code == 0
    before = json.loads(out.splitlines()[0])
    assert before["anomalous"] is None and before["threshold"] is None
    assert before["calibration"].startswith("not calibrated")

    code, out, err = run_cli("calibrate", "-m", path, images["calib"][0].parent, "--false-alarm-rate", "0.1")
    assert code == 0, err
    stored = torch.load(path, map_location="cpu", weights_only=True)["calibration"]
    assert stored["n_images"] == 20 and stored["false_alarm_rate"] == 0.1
    assert stored == json.loads(out)
    assert "from 20 good images" in err

    code, out, err = run_cli(
        "predict", "-m", path, *images["good"], *images["bad"], "-o", tmp_path / "after", "--masks"
    )
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert all(r["threshold"] == stored["image_threshold"] and "calibration" not in r for r in records)
    assert [r["anomalous"] for r in records[3:]] == [True, True, True]
    assert all((tmp_path / "after" / f"{p.stem}_mask.png").is_file() for p in images["bad"])


def test_calibrate_refuses_a_bad_rate_and_a_missing_folder_in_one_line(model, images, tmp_path, capsys):
    path = model.save(tmp_path / "patchcore_tiny.pt")
    with pytest.raises(SystemExit) as refused:  # an argparse type error: exit 2 while parsing
        run_cli("calibrate", "-m", path, images["calib"][0].parent, "--false-alarm-rate", "1.5")
    assert refused.value.code == 2
    code, _, err = run_cli("calibrate", "-m", path, tmp_path / "nowhere")
    assert code == 2 and "nowhere" in err and len(err.strip().splitlines()) == 1
    assert torch.load(path, map_location="cpu", weights_only=True)["calibration"] == {}


def test_old_model_files_keep_their_test_ranges_as_evaluation_figures_not_decisions(model):
    state = model.state_dict()
    state["calibration"] = {
        "map_min": 0.1,
        "map_max": 2.0,
        "score_min": 0.5,
        "score_max": 3.0,
        "image_threshold": 1.5,
    }
    state.pop("evaluation")
    state["digest"] = _state_digest(state)  # as main's format-2 files before good-image calibration
    loaded = PatchCore.from_state_dict(state, device="cpu")
    assert loaded.calibration_ is None
    assert loaded.evaluation_.f1_threshold == 1.5 and loaded.evaluation_.map_max == 2.0
    assert Predictor(loaded).threshold is None


def _samples(n, prefix="train"):
    return [Sample(image_path=Path(f"{prefix}/{i}.png"), label="good") for i in range(n)]


def test_split_holds_out_a_seeded_share_of_train_good_or_uses_validation_images():
    obj = ObjectData(name="o", train=_samples(10), test=[], has_masks=False)
    train, held = split_calibration(obj, 0.3, seed=0)
    assert len(held) == 3 and len(train) == 7 and not set(train) & set(held)
    assert split_calibration(obj, 0.3, seed=0) == (train, held)
    assert split_calibration(obj, 0.0, seed=0) == (obj.train, [])
    # A data set's own validation good images (MVTec LOCO) are used instead, training keeps everything.
    obj.validation = _samples(4, "validation")
    train, held = split_calibration(obj, 0.3, seed=0)
    assert train == obj.train and held == obj.validation


def test_train_with_a_calibration_fraction_stores_a_threshold_from_held_out_good_images(tmp_path):
    data = make_mvtec(tmp_path / "data", classes=("bottle",))
    config = write_config(
        tmp_path / "c.yaml", "mvtec", data, tmp_path / "out",
        evaluation={"heatmaps": 0, "calibration_fraction": 0.34, "false_alarm_rate": 0.2},
    )  # fmt: skip
    code, _, err = run_cli("train", "--config", config)
    assert code == 0, err
    models = tmp_path / "out" / "tiny" / "run" / "models"
    model = PatchCore.load(models / "patchcore_bottle.pt", device="cpu")
    assert model.stats_.n_train_images == 4  # 6 good, 2 held out
    assert model.calibration_.n_images == 2 and model.calibration_.false_alarm_rate == 0.2
    assert model.evaluation_.f1_threshold is not None  # the test-set figure is kept apart from the decision
    meta = json.loads((models / "patchcore_bottle.json").read_text())
    assert meta["calibration"]["image_threshold"] == model.calibration_.image_threshold


def test_train_refuses_bad_calibration_settings_before_creating_a_run_folder(tmp_path):
    data = make_mvtec(tmp_path / "data", classes=("bottle",))
    for key, value in (("calibration_fraction", 1.0), ("false_alarm_rate", 0.0)):
        config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={key: value})
        code, _, err = run_cli("train", "--config", config)
        assert code == 2 and key in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_outlier_fence_flags_exactly_the_injected_defects_up_to_half_of_the_images():
    """The rule of deploy/calibration.py (densest half of the scores, then 6 + sqrt(2 ln n) spreads).
    Catches: a mean/standard-deviation rule (10 defects out of 20 inflate both, nothing is flagged), a
    median/MAD rule (breaks at half), and a fence that flags the goods' own right tail."""
    from patchcore.deploy.calibration import outlier_fence, outlier_report

    rng = np.random.default_rng(7)
    for n_defects in (1, 5, 10):
        goods = rng.gumbel(2.4, 0.03, 20 - n_defects)
        defects = goods[:n_defects] + rng.uniform(0.5, 20.0, n_defects)
        scores = np.concatenate([goods, defects])
        fence = outlier_fence(scores)
        assert set(np.flatnonzero(scores > fence)) == set(range(len(goods), 20)), n_defects
    clean_flags = sum(bool((draw > outlier_fence(draw)).any()) for draw in rng.gumbel(2.4, 0.03, (200, 50)))
    assert clean_flags <= 10  # measured 0.3-5 % for this law; a fence on the goods' tail flags most draws
    assert outlier_fence(rng.gumbel(2.4, 0.03, 7)) is None  # too few images to judge
    assert outlier_report([1.0] * 10, [f"{i}" for i in range(10)], 1.0) is None
