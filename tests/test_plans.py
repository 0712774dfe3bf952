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
        ("switch", "offline", {}, "unknown switch variant"),
        ("composite", None, {"cache_layer": 1}, "caches nothing"),
        ("composite", None, {"cache_block": 0}, "caches nothing"),
        (
            "cmlora",
            "offline",
            {"cache_interval": 1, "cache_block": 0},
            "cache_block set, but this run caches",
        ),
        ("loratorio", None, {"cache_layer": 0}, "caches nothing"),
        ("merge", "offline", {}, "no variants"),
        ("switch", None, {"high": ["a"], "low": ["b"]}, "switch-standard takes no"),
        ("switch", "profiled", {"phase_fraction": 1.5}, "phase_fraction"),
        ("switch", "profiled", {"order": ["a"]}, "order"),
        ("blend", None, {}, "unknown method"),
        ("merge", None, {"text_encoder": "per_lora"}, "per_lora"),
    ],
)
def test_option_errors(method, variant, options, fragment):
    with pytest.raises(OptionError, match=fragment):
        build_method(method, comp(["a", "b"], 10), variant, **options)


def test_composition_errors():
    """Steps and duplicate names are request rules (tests/test_request.py)."""
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


# ----------------------------------------------------------------------------- switch-profiled (Switch-A)

CATS = {
    "c": "character",
    "cl": "clothing",
    "st": "style",
    "ob": "object",
    "bg": "background",
    "bg2": "background",
}


def _switch_a(names, steps, tau, **options):
    m = build_method("switch", comp(names, steps, CATS), "profiled", tau=tau, **options)
    plans = m.plans()
    assert all(len(p.calls) == 1 and p.calls[0].mode == "plain" and p.weights == (1.0,) for p in plans)
    assert all(p.calls[0].adapters == ((p.dominant, 1.0),) for p in plans)
    return m, [p.dominant for p in plans]


@pytest.mark.parametrize(
    "names,steps,tau,expected",
    [
        # 2 LoRAs, no background: H = [c, st]; phase switch at step round(120/220 * 20) = 11
        (["st", "c"], 20, 5, ["c"] * 5 + ["st"] * 5 + ["c"] * 5 + ["st"] * 5),
        (["st", "c"], 20, 1, ["c", "st"] * 5 + ["c"] + ["st"] * 9),
        # 2 LoRAs with a background: H = [c], L = [bg]
        (["bg", "c"], 20, 5, ["c"] * 15 + ["bg"] * 5),
        (["bg", "c"], 20, 1, ["c"] * 11 + ["bg"] * 9),
        # 3 LoRAs with a background: early c, st, c; late starts at bg (not yet active)
        (["bg", "st", "c"], 20, 5, ["c"] * 5 + ["st"] * 5 + ["c"] * 5 + ["bg"] * 5),
        (["bg", "st", "c"], 30, 5, ["c"] * 5 + ["st"] * 5 + ["c"] * 5 + ["st"] * 5 + ["bg"] * 5 + ["st"] * 5),
        (["bg", "st", "c"], 20, 1, ["c", "st"] * 5 + ["c"] + ["bg", "st"] * 4 + ["bg"]),
        # 3 LoRAs without a background: H = [c, st, ob] all active early; late list [st, ob]
        (["ob", "st", "c"], 20, 5, ["c"] * 5 + ["st"] * 5 + ["ob"] * 5 + ["st"] * 5),
        # 5 LoRAs with a background, T = 20: 4 slots cannot show 5 LoRAs; late starts at ob
        (["bg", "ob", "st", "cl", "c"], 20, 5, ["c"] * 5 + ["cl"] * 5 + ["st"] * 5 + ["ob"] * 5),
        (
            ["bg", "ob", "st", "cl", "c"],
            20,
            1,
            ["c", "cl", "st", "ob"] * 2 + ["c", "cl", "st"] + ["bg", "cl", "st", "ob"] * 2 + ["bg"],
        ),
        # 5 LoRAs, T = 50, tau 5: every LoRA active
        (
            ["bg", "ob", "st", "cl", "c"],
            50,
            5,
            [n for n in ["c", "cl", "st", "ob", "c", "cl", "bg", "cl", "st", "ob"] for _ in range(5)],
        ),
    ],
)
def test_switch_profiled_exact_plans(names, steps, tau, expected):
    _, got = _switch_a(names, steps, tau)
    assert got == expected


def test_switch_profiled_every_lora_active_when_slots_suffice():
    names = ["bg", "bg2", "ob", "st", "cl", "c"]
    for tau in (1, 2, 5):
        for steps in range(len(names) * tau, 60):
            _, got = _switch_a(names, steps, tau)
            assert set(got) == set(names), (tau, steps, got)


def test_switch_profiled_order_sources_and_record():
    m, got = _switch_a(["a", "b", "c"], 10, 2, high=["c", "a"], low=["b"])
    assert (m.high, m.low, m.order) == (["c", "a"], ["b"], ["c", "a", "b"])
    assert got == ["c", "c", "a", "a", "c", "c", "b", "b", "a", "a"]
    m, _ = _switch_a(["a", "b", "c"], 10, 2, scores={"a": 0.1, "b": 0.9, "c": 0.8})
    assert m.order[0] == "b" and m.low == ["a"]
    opts = m.options()
    assert (
        opts["variant"] == "profiled" and opts["tau"] == 2 and opts["high"] == m.high and opts["low"] == ["a"]
    )
    assert m.plans()[0].calls[0].embedding == "b"  # text encoder: the first LoRA of the profiled order
    std = build_method("switch", comp(["a", "b"], 4, CATS), tau=1)
    assert std.options()["variant"] == "standard" and "high" not in std.options()


# ----------------------------------------------------------------------------- reference with a background


def _reference_expected(high, low, steps, c):
    """The published offline schedule with a background LoRA, written out from its description."""
    order, r = high + low, len(high)
    out = []
    for i in range(steps):
        k = i // c + 1
        if i <= 120:
            dominant = high[(k - 1) % r]
            full = list(order) if i == 0 else ([dominant] if i % c == 0 else [])
        else:
            dominant = order[(k - 1) % r + 1]
            full = []
        out.append((dominant, full))
    return out


@pytest.mark.parametrize("steps", [20, 30, 220])
@pytest.mark.parametrize(
    "names", [["bg", "st", "c"], ["bg", "ob", "st", "cl", "c"], ["bg2", "bg", "c", "st"]]
)
def test_reference_with_background_is_the_published_schedule(steps, names):
    m = build_method("cmlora", comp(names, steps, CATS), "reference", cache_interval=3)
    plans = m.plans()
    expected = _reference_expected(m.high, m.low, steps, 3)
    assert [(p.dominant, list(p.full)) for p in plans] == expected
    assert m.low and all(b not in {p.dominant for p in plans[:121]} for b in m.low)
    assert all(set(p.full) | set(p.cached) == set(m.order) for p in plans)
    if steps == 220:
        assert all(not p.full for p in plans[121:])
        assert {p.dominant for p in plans[121:]} == set(m.order[1 : len(m.high) + 1])


def test_reference_and_offline_differ_only_with_a_background():
    no_bg = comp(["st", "c", "ob"], 30, CATS)
    ref = build_method("cmlora", no_bg, "reference", cache_interval=3).plans()
    assert [p.dominant for p in ref] == [["c", "st", "ob"][(i // 3) % 3] for i in range(30)]
    with_bg = comp(["bg", "st", "c"], 30, CATS)
    ref = build_method("cmlora", with_bg, "reference", cache_interval=3).plans()
    off = build_method("cmlora", with_bg, "offline", cache_interval=3).plans()
    assert "bg" not in {p.dominant for p in ref} and "bg" in {p.dominant for p in off}


def test_cmlora_cache_interval_1_caches_nothing():
    m = build_method("cmlora", comp(["bg", "st", "c"], 12, CATS), "offline", cache_interval=1)
    assert not m.uses_cache and set(m.intervals.values()) == {1}
    assert all(call.mode == "plain" for p in m.plans() for call in p.calls)
    assert [
        p.dominant for p in build_method("cmlora", comp(["bg", "st", "c"], 4, CATS), cache_interval=1).plans()
    ] == ["c", "st", "st", "bg"]


def test_backgrounds_only_composition_has_a_schedule():
    """No high-frequency LoRA (two backgrounds, no profile): every method still plans."""
    c = comp(["bg", "bg2"], 12, CATS)
    for variant in ("offline", "online", "async", "reference"):
        plans = build_method("cmlora", c, variant).plans()
        assert {p.dominant for p in plans} == {"bg", "bg2"}
    assert {p.dominant for p in build_method("switch", c, "profiled", tau=2).plans()} == {"bg", "bg2"}
