"""RefinePolicy: validation naming the field, the gate, eq. 9's strength, the step split, the guard."""

from __future__ import annotations

import math
from collections import namedtuple

import pytest

from grefine_hooks.policy import RefinePolicy


def test_defaults_are_valid_and_round_trip_through_a_dict():
    policy = RefinePolicy()
    assert RefinePolicy.from_dict(policy.to_dict()) == policy
    custom = RefinePolicy(p_threshold=0.4, strength_min=0.2, refine_steps=12, guard=False, ab_split=0.5)
    assert RefinePolicy.from_dict(custom.to_dict()) == custom


def test_frozen():
    with pytest.raises(AttributeError):
        RefinePolicy().p_threshold = 0.1


@pytest.mark.parametrize(
    "field, value",
    [
        ("p_threshold", 1.5), ("p_threshold", -0.1), ("a_threshold", 2), ("mask_threshold", -1),
        ("strength_min", -0.2), ("strength_max", 1.2), ("stage2_strength", -0.01),
        ("guard_tolerance", 1.1), ("ab_split", 1.5), ("stage1_share", -0.5),
        ("mask_blur", 0.6), ("mask_dilation", -0.1), ("mask_feather", float("nan")),
        ("p_threshold", float("inf")), ("a_threshold", "0.5"), ("refine_steps", 0),
        ("refine_steps", -3), ("refine_steps", 2.5), ("refine_steps", True), ("guard", "yes"), ("strict", 1),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RefinePolicy(**{field: value})


def test_strength_range_must_be_ordered_and_not_zero():
    with pytest.raises(ValueError, match="strength_min"):
        RefinePolicy(strength_min=0.8, strength_max=0.5)
    with pytest.raises(ValueError, match="strength_max"):
        RefinePolicy(strength_min=0.0, strength_max=0.0)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="p_treshold"):
        RefinePolicy.from_dict({"p_treshold": 0.5})


def test_gate():
    policy = RefinePolicy(p_threshold=0.5, a_threshold=0.4)
    assert not policy.needs_refinement(0.5, 0.4)
    assert policy.needs_refinement(0.49, 0.9)
    assert policy.needs_refinement(0.9, 0.39)
    assert not RefinePolicy(p_threshold=0.0, a_threshold=0.0).needs_refinement(0.0, 0.0)
    assert RefinePolicy(p_threshold=1.0, a_threshold=1.0).needs_refinement(0.999, 0.999)


def test_stage1_strength_falls_with_quality_within_the_clamp():
    policy = RefinePolicy(strength_min=0.3, strength_max=0.7)
    strengths = [policy.stage1_strength(q, q) for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert strengths == sorted(strengths, reverse=True)
    assert strengths[0] == pytest.approx(0.7) and strengths[-1] == pytest.approx(0.3)
    assert policy.stage1_strength(0.2, 0.6) == pytest.approx(0.7 - 0.4 * 0.4)
    # "within the clamp": scores outside [0, 1] cannot push the strength past either end.
    assert policy.stage1_strength(1.5, 1.5) == pytest.approx(0.3)
    assert policy.stage1_strength(-0.5, -0.5) == pytest.approx(0.7)


def test_each_stage_takes_half_of_the_iterations_by_default():
    assert RefinePolicy().stage_steps(30) == (15, 15)
    assert RefinePolicy(refine_steps=10, stage1_share=0.7).stage_steps(30) == (7, 3)
    assert RefinePolicy(stage1_share=1.0).stage_steps(4) == (4, 1)
    assert all(steps >= 1 for steps in RefinePolicy(stage1_share=0.0).stage_steps(1))
    assert RefinePolicy(stage1_share=0.0).stage_steps(4) == (1, 3)  # at least one, not more


def test_stage_steps_are_integers():
    n1, n2 = RefinePolicy().stage_steps(7)
    assert isinstance(n1, int) and isinstance(n2, int) and n1 + n2 == 7 and math.isclose(n1, 3.5, abs_tol=0.5)


def test_guard_drops_reverts_only_beyond_the_tolerance():
    Scores = namedtuple("Scores", "p a")
    strict, lenient = RefinePolicy(guard_tolerance=0.0), RefinePolicy(guard_tolerance=0.02 + 1e-9)
    assert strict.guard_drops(Scores(0.5, 0.5), Scores(0.5, 0.5)) == []
    assert strict.guard_drops(Scores(0.5, 0.5), Scores(0.499, 0.6)) == ["p 0.500 -> 0.499"]
    assert lenient.guard_drops(Scores(0.5, 0.5), Scores(0.48, 0.6)) == []
    assert RefinePolicy().guard_drops(Scores(0.5, 0.5), Scores(0.4, 0.3)) == ["p 0.500 -> 0.400", "a 0.500 -> 0.300"]


UNIT_FIELDS = ("p_threshold", "a_threshold", "mask_threshold", "stage2_strength", "guard_tolerance", "ab_split",
               "stage1_share")


@pytest.mark.parametrize("field", UNIT_FIELDS)
@pytest.mark.parametrize("value", [0.0, 1.0, 0, 1])
def test_unit_fields_accept_both_ends(field, value):
    assert getattr(RefinePolicy(**{field: value}), field) == value


@pytest.mark.parametrize("field", ["mask_blur", "mask_dilation", "mask_feather"])
@pytest.mark.parametrize("value", [0.0, 0.5])
def test_mask_fractions_accept_zero_and_half_the_side(field, value):
    assert getattr(RefinePolicy(**{field: value}), field) == value


@pytest.mark.parametrize("field", ["mask_blur", "mask_dilation", "mask_feather"])
def test_mask_fraction_errors_say_what_the_number_is(field):
    with pytest.raises(ValueError, match=rf"^{field} must be in \[0, 0.5\] \(a fraction of the image side\), got 0.6$"):
        RefinePolicy(**{field: 0.6})


def test_strength_ends_and_refine_steps_accept_their_limits():
    assert RefinePolicy(strength_min=0.0, strength_max=1.0).stage1_strength(0.0, 0.0) == 1.0
    assert RefinePolicy(strength_min=0.6, strength_max=0.6).stage1_strength(0.2, 0.9) == 0.6  # equal ends are fine
    assert RefinePolicy(refine_steps=1).stage_steps(30) == (1, 1)
    for flag in ("guard", "strict"):
        assert getattr(RefinePolicy(**{flag: False}), flag) is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stage1_share": 1.5}, "stage1_share must be in [0, 1], got 1.5"),
        ({"p_threshold": "x"}, "p_threshold must be a finite number, got 'x'"),
        ({"strength_min": 0.8, "strength_max": 0.5}, "strength_min (0.8) must not exceed strength_max (0.5)"),
        ({"strength_min": 0.0, "strength_max": 0.0}, "strength_max must be positive: stage 1 with strength 0 changes nothing"),
        ({"refine_steps": 0}, "refine_steps must be an integer >= 1 or None, got 0"),
        ({"guard": 1}, "guard must be True or False, got 1"),
    ],
)
def test_errors_are_the_documented_sentences(kwargs, message):
    with pytest.raises(ValueError) as error:
        RefinePolicy(**kwargs)
    assert str(error.value) == message


def test_from_dict_lists_the_known_fields():
    with pytest.raises(ValueError) as error:
        RefinePolicy.from_dict({"zeta": 1, "alpha": 2})
    assert str(error.value).startswith("unknown RefinePolicy field(s) ['alpha', 'zeta']; known: ['a_threshold', ")
