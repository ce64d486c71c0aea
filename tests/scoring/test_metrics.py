"""Continual-learning summaries on small matrices computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from incr_cli.scoring.continual import summarize

# Rows: v0000 (base), v0001 learned d1, v0002 learned d2, v0003 learned d3; d4 is still pending.
LEARNED_AT = [1, 2, 3, -1]
ACCURACY = np.array([
    [0.10, 0.20, 0.30, 0.40],
    [0.50, 0.25, 0.35, 0.40],
    [0.45, 0.60, 0.40, 0.41],
    [0.40, 0.55, 0.70, 0.42],
])
PERPLEXITY = np.array([
    [100.0, 80.0, 60.0, 50.0],
    [20.0, 70.0, 55.0, 50.0],
    [25.0, 15.0, 50.0, 49.0],
    [30.0, 18.0, 12.0, 48.0],
])


def test_accuracy_summaries_by_hand():
    s = summarize(ACCURACY, LEARNED_AT, higher_is_better=True)
    assert s.final_average == pytest.approx((0.40 + 0.55 + 0.70) / 3)
    # forgetting: best after learning minus final; d3 was learned by the final version itself
    assert s.forgetting[0] == pytest.approx(0.50 - 0.40)
    assert s.forgetting[1] == pytest.approx(0.60 - 0.55)
    assert s.forgetting[2] is None and s.forgetting[3] is None
    assert s.average_forgetting == pytest.approx(0.075)
    # BWT: final minus just-learned
    assert s.backward[:2] == pytest.approx([0.40 - 0.50, 0.55 - 0.60])
    assert s.bwt == pytest.approx(-0.075)
    # FWT: version before the learner minus the base; d1's "version before" is the base itself
    assert s.forward[0] is None and s.forward[3] is None
    assert s.forward[1:3] == pytest.approx([0.25 - 0.20, 0.40 - 0.30])
    assert s.fwt == pytest.approx(0.075)


def test_perplexity_signs_mean_forgot_and_helped():
    s = summarize(PERPLEXITY, LEARNED_AT, higher_is_better=False)
    assert s.final_average == pytest.approx(20.0)
    assert s.forgetting[:2] == pytest.approx([30.0 - 20.0, 18.0 - 15.0])  # final minus best: positive = forgot
    assert s.average_forgetting == pytest.approx(6.5)
    assert s.forgetting_relative[:2] == pytest.approx([10.0 / 20.0, 3.0 / 15.0])  # relative to the best
    assert s.bwt == pytest.approx(-6.5)  # perplexity went up on old data: negative transfer
    assert s.forward[1:3] == pytest.approx([10.0, 10.0])  # earlier increments lowered ppl on unseen data
    assert s.fwt == pytest.approx(10.0)


def test_fwt_is_left_out_with_a_note_when_the_root_is_no_reference():
    """A root with a randomly initialised MLM head: everything else as before, FWT not computed."""
    s = summarize(PERPLEXITY, LEARNED_AT, higher_is_better=False, reference=False)
    fair = summarize(PERPLEXITY, LEARNED_AT, higher_is_better=False)
    assert s.fwt is None and all(f is None for f in s.forward) and "initialised at random" in s.fwt_note
    assert (s.bwt, s.forgetting, s.final_average) == (fair.bwt, fair.forgetting, fair.final_average)
    assert fair.fwt_note is None and s.to_dict(["a", "b", "c", "d"])["fwt_note"] == s.fwt_note


def test_unscored_cells_are_left_out():
    R = ACCURACY.copy()
    R[2, 0] = np.nan  # v0002 not scored on d1: forgetting uses v0001 only
    R[1, 1] = np.nan  # no "version before" score for d2
    s = summarize(R, LEARNED_AT, higher_is_better=True)
    assert s.forgetting[0] == pytest.approx(0.10)
    assert s.forward[1] is None
    assert s.fwt == pytest.approx(0.10)


def test_base_only_and_empty_lineages_have_no_summaries():
    s = summarize(ACCURACY[:1], [-1, -1, -1, -1], higher_is_better=True)
    assert s.final_average is None and s.bwt is None and s.fwt is None and s.average_forgetting is None
    s = summarize(np.zeros((2, 0)), [], higher_is_better=False)
    assert s.final_average is None


def test_to_dict_keys_per_increment_by_name():
    s = summarize(ACCURACY, LEARNED_AT, higher_is_better=True)
    d = s.to_dict(["d1", "d2", "d3", "d4"])
    assert set(d["forgetting"]) == {"d1", "d2"}
    assert set(d["forward"]) == {"d2", "d3"}
    assert math.isclose(d["bwt"], -0.075)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        summarize(ACCURACY, [1, 2], higher_is_better=True)
    with pytest.raises(ValueError):
        summarize(ACCURACY, [1, 2, 9, -1], higher_is_better=True)
