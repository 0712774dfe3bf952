"""Exact per-step plans of every method (no model involved)."""

import math

import pytest

from cmlora.errors import OptionError
from cmlora.methods import Composition, StepState, build_method
from cmlora.plans import dominance_weights, refresh_steps


def comp(names, steps, categories=None, weights=None, scale=1.0):
    categories = categories or {}
    return Composition(
        names=tuple(names),
        weights={n: (weights or {}).get(n, 1.0) for n in names},
        categories={n: categories.get(n) for n in names},
        num_steps=steps,
        lora_scale=scale,
    )


FOUR = comp(
    ["bg", "char", "style", "cloth"],
    12,
    {"bg": "background", "char": "character", "style": "style", "cloth": "clothing"},
)


def test_none_and_merge():
    c = comp(["a", "b"], 3, weights={"a": 1.0, "b": 0.5}, scale=0.8)
    none = build_method("none", c).plans()
    assert all(p.calls[0].adapters == () and p.calls[0].embedding == "none" for p in none)
    merge = build_method("merge", c).plans()
    assert [p.calls[0].adapters for p in merge] == [(("a", 0.8), ("b", 0.4))] * 3
    assert all(p.weights == (1.0,) and p.calls[0].mode == "plain" for p in merge)


def test_switch_boundaries_character_first_no_off_by_one():
    c = comp(["x", "y", "hero"], 7, {"hero": "character"})
    plans = build_method("switch", c, tau=2).plans()
    assert [p.dominant for p in plans] == ["hero", "hero", "x", "x", "y", "y", "hero"]
    assert all(len(p.calls) == 1 for p in plans)
    # the published code gave the first LoRA tau + 1 steps; here exactly tau
    assert sum(p.dominant == "hero" for p in plans[:4]) == 2
    assert plans[0].calls[0].embedding == "hero"  # text encoder: first LoRA only (published)


def test_composite_weights_and_calls():
    c = comp(["a", "b", "c"], 2, weights={"a": 2.0, "b": 1.0, "c": 1.0})
    plans = build_method("composite", c).plans()
    assert [len(p.calls) for p in plans] == [3, 3]
    assert plans[0].weights == pytest.approx((0.5, 0.25, 0.25))
    assert [call.adapters for call in plans[0].calls] == [(("a", 1.0),), (("b", 1.0),), (("c", 1.0),)]
    assert all(call.mode == "plain" for p in plans for call in p.calls)


def test_composite_with_cache_refreshes_every_c_spread():
    c = comp(["a", "b", "c"], 7)
    plans = build_method("composite", c, cache_interval=3).plans()
    full = [p.full for p in plans]
    assert full == [("a", "b", "c"), ("b",), ("c",), ("a",), ("b",), ("c",), ("a",)]


@pytest.mark.parametrize(
    "n,dom,other", [(2, 0.600, 0.400), (3, 0.556, 0.222), (4, 0.538, 0.154), (5, 0.529, 0.118)]
)
def test_published_dominance_weights(n, dom, other):
    d, o = dominance_weights(n, n - 0.5)
    assert round(d, 3) == dom and round(o, 3) == other
    assert math.isclose(d + (n - 1) * o, 1.0)


def test_cmlora_offline_exact_plan():
    m = build_method("cmlora", FOUR, "offline")
    assert (m.high, m.low) == (["char", "cloth", "style"], ["bg"])
    plans = m.plans()
    # phase switch at round(0.545 * 12) = 7 -> first dominance slot starting at/after it: slot 3 (step 9)
    assert [p.dominant for p in plans] == ["char"] * 3 + ["cloth"] * 3 + ["style"] * 3 + ["cloth"] * 3
    # intervals: H every 3 steps (offsets 0, 1, 2 spread), L every 6 (offset 3)
    assert [set(p.full) for p in plans] == [
        {"char", "cloth", "style", "bg"},
        {"cloth"},
        {"style"},
        {"char", "bg"},
        {"cloth"},
        {"style"},
        {"char"},
        {"cloth"},
        {"style"},
        {"char", "bg"},
        {"cloth"},
        {"style"},
    ]
    dom, other = dominance_weights(4, 3.5)
    assert plans[0].weights == pytest.approx((dom, other, other, other))  # order char, cloth, style, bg
    assert [c.cache_key for c in plans[0].calls] == ["char", "cloth", "style", "bg"]
    assert sum(len(p.full) for p in plans) == 4 + 11 + 2


def test_cmlora_late_phase_lets_background_dominate():
    c = comp(["char", "bg"], 12, {"char": "character", "bg": "background"})
    plans = build_method("cmlora", c, "offline", cache_interval=2, phase_fraction=0.5).plans()
    assert [p.dominant for p in plans] == ["char"] * 6 + ["bg"] * 6
    assert [p.info["phase"] for p in plans] == ["early"] * 6 + ["late"] * 6


def test_cmlora_decay_and_async_cadence():
    c = comp(["a", "b", "c"], 12)
    m = build_method("cmlora", c, "async", async_interval=4)  # default decay 0.5
    plans = m.plans()
    assert [p.dominant for p in plans] == ["a"] * 4 + ["b"] * 4 + ["b"] * 4
    ws = [p.info["w_dom"] for p in plans]
    assert ws[0] == 2.5 and ws[4] == pytest.approx(1 + 1.5 * 0.5) and ws[8] == ws[4]
    assert min(ws) >= 1.0
    offline = build_method("cmlora", c, "offline").plans()
    assert {p.info["w_dom"] for p in offline} == {2.5}  # d = 1: published constant weights


def test_cmlora_online_switches_on_statistic():
    c = comp(["a", "b", "bg"], 9, {"bg": "background"})
    m = build_method("cmlora", c, "online", cache_interval=3, threshold=0.4)
    stats = [0.9, 0.8, 0.7, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1]
    plans = m.plans([StepState(high_frequency=s) for s in stats])
    # the statistic drops below 0.4 at step 4; the phase changes at the next boundary (step 6)
    assert [p.dominant for p in plans] == ["a", "a", "a", "b", "b", "b", "b", "b", "b"]
    assert [p.info["phase"] for p in plans] == ["early"] * 6 + ["late"] * 3
    never = build_method("cmlora", c, "online").plans([StepState(high_frequency=0.9)] * 9)
    assert all(p.info["phase"] == "early" for p in never)


@pytest.mark.parametrize("n,steps,c", [(2, 10, 3), (3, 20, 3), (4, 30, 2), (5, 25, 5), (3, 7, 7)])
def test_reference_call_count_closed_form(n, steps, c):
    names = [f"l{k}" for k in range(n)]
    plans = build_method("cmlora", comp(names, steps), "reference", cache_interval=c).plans()
    assert sum(len(p.full) for p in plans) == n + (steps - 1) // c
    assert sum(len(p.cached) for p in plans) == n * steps - (n + (steps - 1) // c)
    for p in plans:
        k = p.step // c
        assert p.dominant == names[k % n]
        if p.step and p.step % c == 0:
            assert p.full == (p.dominant,)
    assert {p.info["w_dom"] for p in plans} == {n - 0.5}


def test_explicit_order_partition_and_intervals():
    c = comp(["a", "b", "c"], 6)
    m = build_method("cmlora", c, "offline", high=["c"], low=["a", "b"], intervals={"a": 1})
    assert m.order == ["c", "a", "b"] and m.intervals == {"c": 3, "a": 1, "b": 6}
    assert all("a" in p.full for p in m.plans())
    m = build_method("cmlora", c, "offline", scores={"a": 0.1, "b": 0.9, "c": 0.8})
    assert m.order[0] == "b" and m.low == ["a"]


def test_refresh_steps_helper():
    assert refresh_steps(10, 3, 0) == {0, 3, 6, 9}
    assert refresh_steps(10, 3, 2) == {0, 2, 5, 8}
    assert refresh_steps(4, 1, 0) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "method,variant,options,fragment",
    [
        ("switch", None, {"tau": 0}, "tau"),
        ("cmlora", "offline", {"w_dom": 0.5}, "w_dom"),
        ("cmlora", "offline", {"decay": 0.0}, "decay"),
        ("cmlora", "offline", {"cache_interval": 0}, "cache_interval"),
        ("cmlora", "reference", {"cache_interval": 1}, "cache_interval >= 2"),
        ("cmlora", "sideways", {}, "unknown cmlora variant"),
        ("cmlora", "offline", {"intervals": {"zz": 2}}, "zz"),
        ("cmlora", "offline", {"order": ["a"]}, "order"),
        ("cmlora", "offline", {"threshold": float("nan")}, "threshold"),
        ("merge", None, {"tau": 3}, "no option"),
        ("switch", "offline", {}, "no variants"),
        ("blend", None, {}, "unknown method"),
        ("merge", None, {"text_encoder": "per_lora"}, "per_lora"),
    ],
)
def test_option_errors(method, variant, options, fragment):
    with pytest.raises(OptionError, match=fragment):
        build_method(method, comp(["a", "b"], 10), variant, **options)


def test_composition_errors():
    with pytest.raises(OptionError, match="num_inference_steps"):
        comp(["a"], 0)
    with pytest.raises(OptionError, match="duplicate"):
        comp(["a", "a"], 3)
    with pytest.raises(OptionError, match="at least one LoRA"):
        build_method("composite", comp([], 3))


def test_cmlora_async_exact_plan():
    """Every step's full/cached split and weights: refreshes every c = 3 steps (offsets spread),
    dominance on its own cadence of 4 steps, w decaying from 2.5 to 1 + 1.5 * 0.5 after the change."""
    plans = build_method("cmlora", comp(["a", "b", "c"], 12), "async", async_interval=4).plans()
    assert [p.full for p in plans] == [("a", "b", "c")] + [("b",), ("c",), ("a",)] * 3 + [("b",), ("c",)]
    assert [set(p.full) | set(p.cached) for p in plans] == [{"a", "b", "c"}] * 12
    assert all(
        c.mode in ("full", "cached") and c.adapters == ((c.cache_key, 1.0),) for p in plans for c in p.calls
    )
    early, late = dominance_weights(3, 2.5), dominance_weights(3, 1.75)
    assert [p.weights for p in plans[:4]] == [pytest.approx((early[0], early[1], early[1]))] * 4
    assert [p.weights for p in plans[4:]] == [pytest.approx((late[1], late[0], late[1]))] * 8


def test_cmlora_online_exact_plan():
    """The online variant's full calls follow the per-LoRA intervals (H every 3, L every 6) whatever
    the statistic does; only dominance follows it, with constant w = N - 0.5."""
    c = comp(["a", "b", "bg"], 9, {"bg": "background"})
    stats = [0.9, 0.8, 0.7, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1]
    plans = build_method("cmlora", c, "online", cache_interval=3, threshold=0.4).plans(
        [StepState(high_frequency=s) for s in stats]
    )
    assert [p.full for p in plans] == [
        ("a", "b", "bg"),
        ("b",),
        ("bg",),
        ("a",),
        ("b",),
        (),
        ("a",),
        ("b",),
        ("bg",),
    ]
    assert [p.cached for p in plans][5] == ("a", "b", "bg")
    dom, other = dominance_weights(3, 2.5)
    assert [p.weights for p in plans] == [pytest.approx((dom, other, other))] * 3 + [
        pytest.approx((other, dom, other))
    ] * 6
    assert [p.info["high_frequency"] for p in plans] == stats
