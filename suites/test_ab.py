"""`bnbench ab`: the paired statistics on synthetic samples (known ratios, known noise), the stop
rule, the verdicts' boundaries, the parent's handling of sides that fail or lie, the JSON and the
report section, and one real interleaved run through the command line."""

from __future__ import annotations

import itertools
import json
import math
import textwrap

import numpy as np
import pytest

from bnbench import ab
from bnbench.ab import Estimate, Plan
from bnbench.benchmark import SMOKE, Row

from helpers import bnbench, in_process

# ---------------------------------------------------------------------------------------------
# Synthetic pairs: a common drift both sides share (the machine's state: up to 3x, slowly
# varying), the candidate's true ratio, and independent lognormal noise on every block.


def synthetic_pairs(rng, n, ratio, sigma, spikes=0.0):
    drift = np.exp(np.cumsum(rng.normal(0, 0.05, n)).clip(-1.1, 1.1))
    a = 1e-3 * drift * np.exp(rng.normal(0, sigma, n))
    b = ratio * 1e-3 * drift * np.exp(rng.normal(0, sigma, n))
    if spikes:  # a neighbour hitting one block of a pair now and then, either side
        hit_a, hit_b = rng.random(n) < spikes, rng.random(n) < spikes
        a = np.where(hit_a, a * 1.8, a)
        b = np.where(hit_b, b * 1.8, b)
    return a, b


def brute_force_depth(n, confidence=0.95):
    """k from the signed-rank statistic's distribution, counted over every sign vector."""
    sums = [
        sum(rank for rank, positive in zip(range(1, n + 1), signs) if positive)
        for signs in itertools.product((0, 1), repeat=n)
    ]
    counts = np.bincount(sums, minlength=n * (n + 1) // 2 + 1) / 2**n
    cdf = np.cumsum(counts)
    return int(np.sum(cdf <= (1 - confidence) / 2 + 1e-15))


@pytest.mark.parametrize("n", range(1, 13))
def test_signed_rank_depth_is_the_counted_distributions(n):
    assert ab.signed_rank_depth(n) == brute_force_depth(n)
    assert ab.signed_rank_depth(n, 0.9) == brute_force_depth(n, 0.9)


def test_signed_rank_depth_known_values_and_the_normal_tail():
    # tables (two-sided 5%): no interval below 6 pairs; 6 pairs: the extremes (96.9%)
    assert [ab.signed_rank_depth(n) for n in (5, 6, 10, 20)] == [0, 1, 9, 53]
    exact = ab.signed_rank_depth(ab.EXACT_SIGNED_RANK)
    normal = ab.signed_rank_depth(ab.EXACT_SIGNED_RANK + 1)
    assert exact < normal < exact + 2 * ab.EXACT_SIGNED_RANK  # continuous across the switch
    assert abs(normal - exact) / exact < 0.02


def test_hodges_lehmann_estimate_and_interval_on_known_values():
    estimate, low, high = ab.hodges_lehmann(np.array([1.0, 2.0, 3.0, 4.0, 100.0, 5.0]))
    walsh = sorted(
        (x + y) / 2 for i, x in enumerate([1, 2, 3, 4, 100, 5]) for y in [1, 2, 3, 4, 100, 5][i:]
    )
    assert estimate == pytest.approx(np.median(walsh))
    assert (low, high) == (walsh[0], walsh[-1])  # 6 pairs: k = 1
    assert ab.hodges_lehmann(np.array([0.1] * 5))[1:] == (-math.inf, math.inf)
    assert math.isnan(ab.hodges_lehmann(np.array([]))[0])


@pytest.mark.parametrize("ratio", [1.0, 1.3, 2.0])
@pytest.mark.parametrize("spikes", [0.0, 0.1])
def test_intervals_cover_the_true_ratio(ratio, spikes):
    rng = np.random.default_rng(int(ratio * 10) + int(spikes * 100))
    trials, covered, widths = 300, 0, []
    for _ in range(trials):
        a, b = synthetic_pairs(rng, 40, ratio, 0.1, spikes)
        e = ab.paired_estimate(a, b)
        covered += e.low <= ratio <= e.high
        widths.append(e.high / e.low)
    assert 0.92 <= covered / trials <= 0.99
    # pairing removes the drift both sides share: the interval reflects the noise alone
    assert np.median(widths) < 1.2


@pytest.mark.parametrize(
    "ratio,expected",
    [(1.0, "same"), (1.3, "slower"), (2.0, "slower"), (0.5, "faster"), (1 / 1.3, "faster")],
)
def test_verdicts_come_out_right_on_synthetic_pairs(ratio, expected):
    rng = np.random.default_rng(7)
    for _ in range(20):
        a, b = synthetic_pairs(rng, 60, ratio, 0.08, spikes=0.05)
        e = ab.paired_estimate(a, b)
        assert ab.verdict(e.low, e.high, 10) == expected, (ratio, e)


def test_a_ratio_on_the_threshold_is_unsure_and_more_time_cannot_settle_it():
    rng = np.random.default_rng(3)
    a, b = synthetic_pairs(rng, 200, 1.1, 0.05)
    e = ab.paired_estimate(a, b)
    assert ab.verdict(e.low, e.high, 10) == "unsure"
    assert ab.settle_factor(1.1, 1.05, 1.15, 10) == math.inf


def test_verdict_boundaries():
    limit = 1.1
    assert ab.verdict(limit + 1e-9, 3.0, 10) == "slower"
    assert ab.verdict(limit, 3.0, 10) == "unsure"  # the whole interval must lie above
    assert ab.verdict(0.2, 1 / limit - 1e-9, 10) == "faster"
    assert ab.verdict(0.2, 1 / limit, 10) == "unsure"
    assert ab.verdict(1 / limit, limit, 10) == "same"  # inside, bounds included
    assert ab.verdict(1 / limit - 1e-9, limit, 10) == "unsure"
    assert ab.verdict(1.0, limit + 1e-9, 10) == "unsure"
    assert ab.verdict(-math.inf, math.inf, 10) == "unsure"
    assert ab.verdict(0.0, 2.0, 10) == "unsure"
    assert ab.verdict(1.0 + 1e-12, 1.5, 0) == "slower"
    assert ab.verdict(1.0, 1.0, 0) == "same"


def test_settle_factor_says_how_many_more_pairs_decide():
    # half-width log(1.2), distance to the threshold log(1.2 / 1.1): (0.182 / 0.087)^2 = 4.4
    factor = ab.settle_factor(1.2, 1.0, 1.44, 10)
    assert factor == pytest.approx((math.log(1.2) / math.log(1.2 / 1.1)) ** 2)
    assert ab.settle_factor(1.3, 1.2, 1.4, 10) == 1.0  # decided already
    assert ab.settle_factor(1.0, 0.0, math.inf, 10) == math.inf
    # and it is right: the factor's worth of pairs decides a case that was unsure
    rng = np.random.default_rng(11)
    settled = 0
    for _ in range(40):
        a, b = synthetic_pairs(rng, 12, 1.3, 0.3)
        e = ab.paired_estimate(a, b)
        if ab.verdict(e.low, e.high, 10) != "unsure":
            continue
        factor = ab.settle_factor(e.ratio, e.low, e.high, 10)
        more = int(math.ceil(12 * min(factor, 50) * 1.5))
        a, b = synthetic_pairs(rng, more, 1.3, 0.3)
        e = ab.paired_estimate(a, b)
        settled += ab.verdict(e.low, e.high, 10) == "slower"
        assert math.isfinite(factor)
    assert settled >= 10


def test_pooled_is_the_geometric_mean_with_a_narrower_interval():
    estimates = [Estimate(1.2, 1.0, 1.44), Estimate(1.5, 1.25, 1.8), Estimate(0.9, 0.8, 1.0125)]
    total = ab.pooled(estimates)
    assert total.ratio == pytest.approx((1.2 * 1.5 * 0.9) ** (1 / 3))
    widths = [math.log(e.high / e.low) for e in estimates]
    assert math.log(total.high / total.low) < min(widths)
    assert math.log(total.high / total.low) == pytest.approx(
        math.sqrt(sum(w * w for w in widths)) / 3, rel=1e-9
    )
    # a case without an interval does not enter it; none at all: no interval
    assert ab.pooled(estimates + [Estimate(5.0, -math.inf, math.inf)]).ratio == total.ratio
    assert not ab.pooled([Estimate(1.0, -math.inf, math.inf)]).decided


def test_orders_are_balanced_quadruples_and_random():
    rng = np.random.default_rng(0)
    orders = ab.balanced_orders(rng, 200)
    assert len(orders) == 400
    for first, second in zip(orders[::2], orders[1::2]):
        assert first == second[::-1]  # ABBA or BAAB
    firsts = [o[0] == "baseline" for o in orders[::2]]
    assert 70 < sum(firsts) < 130  # a coin per quadruple


def test_calls_per_block_is_the_same_for_both_sides_and_bounded():
    assert ab.calls_per_block(1e-4, 4e-4, 0.01) == 50  # the geometric mean's 2e-4
    assert ab.calls_per_block(1.0, 2.0, 0.01) == 1
    assert ab.calls_per_block(0.0, 0.0, 0.01) == 100_000


# ---------------------------------------------------------------------------------------------
# The stop rule, on synthetic pairs with a clock of our own


class Synthetic:
    """take_pair for collect_pairs: pairs from synthetic_pairs, one per call, and a clock that
    advances ``tick`` per pair."""

    def __init__(self, ratio, sigma, tick=0.01, seed=0):
        self.rng = np.random.default_rng(seed)
        self.ratio, self.sigma, self.tick = ratio, sigma, tick
        self.now, self.calls = 0.0, 0

    def __call__(self, order):
        self.calls += 1
        self.now += self.tick
        a, b = synthetic_pairs(self.rng, 1, self.ratio, self.sigma)
        return {"baseline": float(a[0]), "candidate": float(b[0])}

    def clock(self):
        return self.now


PLAN = Plan(case_budget_s=1.0, block_s=0.005, min_pairs=12, max_pairs=500, warmup_s=0.0)


def test_a_clear_slowdown_stops_at_the_look_that_confirms_it_after_one_warm_up_pair():
    source = Synthetic(2.0, 0.05)
    pairs = ab.collect_pairs(source, PLAN, 10, np.random.default_rng(0), source.clock)
    # slower at min_pairs, confirmed as many pairs later
    assert len(pairs.baseline) == 2 * PLAN.min_pairs
    assert source.calls == len(pairs.baseline) + 1  # the first pair was a warm-up
    assert ab.verdict(pairs.estimate.low, pairs.estimate.high, 10) == "slower"
    assert len(pairs.baseline_first) == len(pairs.baseline)


def test_a_burst_that_says_slower_once_does_not_decide_the_case():
    class Burst(Synthetic):
        def __call__(self, order):
            pair = super().__call__(order)
            if self.calls <= PLAN.min_pairs + 1:  # the candidate's first pairs hit by noise
                pair["candidate"] *= 1.6
            return pair

    source = Burst(1.0, 0.05)
    pairs = ab.collect_pairs(source, PLAN, 10, np.random.default_rng(0), source.clock)
    first = ab.paired_estimate(
        np.array(pairs.baseline[: PLAN.min_pairs]), np.array(pairs.candidate[: PLAN.min_pairs])
    )
    assert ab.verdict(first.low, first.high, 10) == "slower"  # the first look said so
    assert ab.verdict(pairs.estimate.low, pairs.estimate.high, 10) != "slower"


def test_a_noisy_same_takes_pairs_until_its_interval_fits_inside_the_threshold():
    source = Synthetic(1.0, 0.25, tick=0.001)
    pairs = ab.collect_pairs(source, PLAN, 10, np.random.default_rng(0), source.clock)
    n = len(pairs.baseline)
    assert PLAN.min_pairs < n < PLAN.max_pairs
    e = pairs.estimate
    assert ab.verdict(e.low, e.high, 10) == "same"
    # it stopped at the first look that decided: the look before did not
    earlier = ab.paired_estimate(
        np.array(pairs.baseline[: n - max(2, (n - 2) // 8)]),
        np.array(pairs.candidate[: n - max(2, (n - 2) // 8)]),
    )
    assert ab.verdict(earlier.low, earlier.high, 10) == "unsure"


def test_a_ratio_on_the_threshold_runs_until_the_budget_or_the_maximum():
    source = Synthetic(1.1, 0.05, tick=0.01)
    pairs = ab.collect_pairs(source, PLAN, 10, np.random.default_rng(0), source.clock)
    assert abs(pairs.seconds - PLAN.case_budget_s) <= 0.011  # its budget, by the clock
    assert len(pairs.baseline) == pytest.approx(PLAN.case_budget_s / 0.01, abs=2)
    source = Synthetic(1.1, 0.05, tick=1e-6)
    pairs = ab.collect_pairs(source, PLAN, 10, np.random.default_rng(0), source.clock)
    assert len(pairs.baseline) == PLAN.max_pairs
    assert ab.verdict(pairs.estimate.low, pairs.estimate.high, 10) == "unsure"


# ---------------------------------------------------------------------------------------------
# The parent's side with sides that fail or lie (no processes: scripted answers)


class FakeSide:
    """What _compare_case talks to: scripted answers to prepare, block and finish."""

    def __init__(self, verified="pass", block=lambda n: {"seconds": 1e-4}, prepare=None):
        self.fatal, self.alive, self.item = None, True, None
        self.verified, self.block, self.prepare = verified, block, prepare
        self.seq, self.blocks, self.pending = 0, 0, {}
        self.closed = False

    def start(self):
        self.alive = True

    def ready(self):
        pass

    def send(self, op, **fields):
        self.seq += 1
        self.pending[self.seq] = op
        return self.seq

    def answer(self, seq, deadline):
        op = self.pending.pop(seq)
        if op == "prepare":
            reply = self.prepare or {
                "status": "ok",
                "verified": self.verified,
                "per_call_s": 1e-5,
            }
            return dict(reply, reply=seq)
        self.blocks += 1
        return dict(self.block(self.blocks), reply=seq)

    def done(self, deadline):
        self.item = None
        return None

    def close(self):
        self.closed, self.alive = True, False


ROW = Row((8, 16, 8, 8), "float32", "contiguous", "forward_train")
FAST = Plan(case_budget_s=0.5, block_s=0.001, min_pairs=8, max_pairs=40, warmup_s=0.0)


def compare(baseline, candidate):
    sides = {"baseline": baseline, "candidate": candidate}
    return ab._compare_case(sides, 0, ROW, FAST, 10, 5.0, np.random.default_rng(0))


def test_both_sides_measured_give_a_ratio_and_a_verdict():
    case = compare(FakeSide(), FakeSide(block=lambda n: {"seconds": 2e-4}))
    assert (case.status, case.verdict) == ("ok", "slower")
    assert case.ratio == pytest.approx(2.0)
    assert case.baseline_verified == case.candidate_verified == "pass"
    assert case.pairs == 2 * FAST.min_pairs and len(case.candidate_samples) == case.pairs


@pytest.mark.parametrize("verdict", ["fail", "unexpected-pass", "waived"])
def test_a_side_that_fails_verification_gets_no_speed_verdict(verdict):
    candidate = FakeSide(verified=verdict)
    case = compare(FakeSide(), candidate)
    assert (case.status, case.side, case.verdict) == ("failed-verification", "candidate", "")
    assert case.ratio is None and candidate.blocks == 0  # not timed at all
    assert case.lost
    both = compare(FakeSide(verified="fail"), FakeSide(verified="fail"))
    assert (both.status, both.side) == ("failed-verification", "both") and not both.lost


def test_a_declared_deviation_is_still_compared():
    case = compare(FakeSide(), FakeSide(verified="deviation"))
    assert case.status == "ok" and case.candidate_verified == "deviation"


def test_a_block_that_raises_costs_the_case_on_its_side():
    case = compare(FakeSide(), FakeSide(block=lambda n: {"error": "RuntimeError: boom <b>"}))
    assert (case.status, case.side) == ("error", "candidate")
    assert "raised while timed: RuntimeError: boom" in case.message and case.lost


def test_a_block_longer_than_the_parent_waited_is_a_lie():
    liar = FakeSide(block=lambda n: {"seconds": 50.0})
    case = compare(liar, FakeSide())
    assert (case.status, case.side) == ("error", "baseline")
    assert "longer than" in case.message and liar.closed and not case.lost


@pytest.mark.parametrize(
    "answer",
    [
        {"seconds": float("nan")},
        {"seconds": -1.0},
        {"seconds": 0.0},
        {"seconds": "0.001"},
        {"seconds": True},
        {"seconds": 1e-4, "extra": 1},
    ],
)
def test_an_invalid_block_answer_costs_the_case(answer):
    case = compare(FakeSide(), FakeSide(block=lambda n: answer))
    assert (case.status, case.side) == ("error", "candidate")
    assert "invalid answer" in case.message


def test_a_side_that_dies_while_timed_costs_the_case_and_the_next_one_starts_it_again():
    def dies(n):
        if n == 3:
            raise ab._SideFailure("crashed", "the worker process died (exit code -9, SIGKILL)")
        return {"seconds": 1e-4}

    candidate = FakeSide(block=dies)
    case = compare(FakeSide(), candidate)
    assert (case.status, case.side) == ("crashed", "candidate") and "SIGKILL" in case.message
    candidate.alive = False  # what _Side does when its worker dies
    candidate.block = lambda n: {"seconds": 1e-4}
    again = compare(FakeSide(), candidate)
    assert again.status == "ok" and candidate.alive


def test_not_supported_and_load_failures_name_the_side():
    unsupported = {"status": "not-supported", "verified": "not-supported", "message": "no rank 4"}
    case = compare(FakeSide(), FakeSide(prepare=unsupported))
    assert (case.status, case.side) == ("not-supported", "candidate") and not case.lost
    dead = FakeSide()
    dead.fatal = "crashed: the candidate's worker could not load the implementation"
    case = compare(FakeSide(), dead)
    assert (case.status, case.side) == ("crashed", "candidate") and case.lost


# ---------------------------------------------------------------------------------------------
# The result, its JSON, the report


def case_result(verdict="same", ratio=1.0, status="ok", side="", message=""):
    low, high = (ratio / 1.05, ratio * 1.05) if status == "ok" else (None, None)
    return ab.CaseResult(
        mode="forward_train",
        shape="8x16x8x8",
        dtype="float32",
        memory_format="contiguous",
        model="",
        status=status,
        side=side,
        message=message,
        pairs=20 if status == "ok" else 0,
        ratio=ratio if status == "ok" else None,
        ci_low=low,
        ci_high=high,
        verdict=verdict if status == "ok" else "",
        baseline_s=1e-4 if status == "ok" else None,
        candidate_s=ratio * 1e-4 if status == "ok" else None,
        baseline_samples=[1e-4] * 3,
        candidate_samples=[ratio * 1e-4] * 3,
        baseline_first=[True, False, True],
    )


def result(cases, per_case=False):
    return ab.ABResult(
        baseline="old:BN",
        candidate="new:BN",
        baseline_path="/somewhere",
        device="cpu",
        threads=1,
        sweep="smoke",
        threshold_pct=10.0,
        per_case=per_case,
        seed=1,
        plan=ab.PLANS["smoke"],
        cases=cases,
        files={"baseline": "/somewhere/old.py", "candidate": "/here/new.py"},
        seconds=3.0,
    )


def test_the_gate_decides_on_the_geometric_mean_lost_cases_and_per_case():
    same = [case_result() for _ in range(5)]
    assert result(same).ok and result(same).summary.verdict == "same"
    one_slower = same[:4] + [case_result("slower", 1.5)]
    assert result(one_slower).ok  # the geometric mean 1.08 is not slower
    assert not result(one_slower, per_case=True).ok
    slower = [case_result("slower", 1.3) for _ in range(5)]
    assert not result(slower).ok and "slower" in result(slower).reasons()[0]
    lost = same + [case_result(status="crashed", side="candidate", message="died")]
    assert not result(lost).ok and "failed where the baseline did not" in result(lost).reasons()[0]
    gained = same + [case_result(status="crashed", side="baseline")]
    assert result(gained).ok
    assert not result([case_result(status="not-supported", side="both")]).ok  # nothing compared


def test_the_json_is_strict_and_the_report_reads_it_back(tmp_path):
    cases = [
        case_result("slower", 1.3),
        case_result(status="error", side="candidate", message="raised <script>x|y</script>"),
    ]
    path = tmp_path / "ab.json"
    path.write_text(result(cases).to_json())
    document = json.loads(path.read_text())
    assert document["schema"] == ab.AB_SCHEMA and document["ok"] is False
    assert document["cases"][0]["baseline_samples"] == [1e-4] * 3
    assert document["summary"]["verdict"] == "slower"
    loaded = ab.load_document(path)
    assert loaded.cases[1].status == "error" and loaded.summary.cases == 1


@pytest.mark.parametrize(
    "damage,field",
    [
        (lambda d: d["cases"][0].update(ratio="fast"), "cases.0.ratio"),
        (lambda d: d["cases"][0].update(ratio=-1.0), "cases.0.ratio"),
        (lambda d: d["cases"][0].update(verdict="maybe"), "cases.0.verdict"),
        (lambda d: d["cases"][0].update(status="fine"), "cases.0.status"),
        (lambda d: d["summary"].update(verdict="sure"), "summary.verdict"),
        (lambda d: d.update(schema="other/1"), "schema"),
        (lambda d: d.pop("cases"), "cases"),
    ],
)
def test_an_unusable_ab_json_is_an_error_naming_the_field(tmp_path, damage, field):
    document = json.loads(result([case_result("slower", 1.3)]).to_json())
    damage(document)
    path = tmp_path / "ab.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ab.load_document(path)
    path.write_text('{"schema": "bnbench-ab/1", "threads": NaN}')
    with pytest.raises(ValueError, match="not JSON"):
        ab.load_document(path)


def write_results_directory(path):
    """A minimal bnbench bench directory for the report to read ab.json beside."""
    from bnbench.results import BENCH_SCHEMA, COLUMNS, to_csv

    path.mkdir(parents=True)
    row = {
        "implementation": "builtin",
        "device": "cpu",
        "dtype": "float32",
        "mode": "forward_train",
        "batch_size": 8,
        "channels": 16,
        "spatial": "8x8",
        "rank": 4,
        "shape": "8x16x8x8",
        "memory_format": "contiguous",
        "status": "ok",
        "verified": "pass",
        "median_s": 1e-4,
        "p20_s": 0.9e-4,
        "p80_s": 1.1e-4,
        "repetitions": 7,
        "threads": 2,
        "model": "",
        "message": "",
    }
    (path / "results.csv").write_text(to_csv([row], COLUMNS))
    env = {"schema": BENCH_SCHEMA, "host": "test", "complete": True, "cpu_count": 2}
    (path / "environment.json").write_text(json.dumps(env))


def test_the_report_has_an_ab_section_escaped(tmp_path, monkeypatch):
    from bnbench import report

    monkeypatch.setattr(report, "make_plots", lambda *args, **kwargs: iter(()))
    run = tmp_path / "run"
    write_results_directory(run)
    cases = [
        case_result("slower", 1.3),
        case_result(status="error", side="candidate", message="raised <script>x|y</script>"),
    ]
    (run / "ab.json").write_text(result(cases).to_json())
    out = tmp_path / "out"
    done = in_process("report", str(run), "--output", str(out))
    assert done.returncode == 0, done.stdout
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    section = md.split(f"\n## {report.AB_HEADING}\n", 1)[1].split("\n## ", 1)[0]
    assert "new:BN / old:BN (baseline from /somewhere)" in section
    assert "geometric mean 1.300" in section and "FAILED" in section
    assert "x&#124;y" in section and "<script>" not in md  # a Markdown cell escaped
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert (out / "ab.csv").is_file()
    # a broken ab.json is unusable input (exit 2) naming it
    (run / "ab.json").write_text("{}")
    broken = in_process("report", str(run), "--output", str(out))
    assert broken.returncode == 2 and "ab.json" in broken.stdout + broken.stderr


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize(
    "args,message",
    [
        (["nosuch", "builtin"], "unknown implementation 'nosuch'"),
        (["builtin", "builtin", "--baseline-path", "."], "must be MODULE:ATTR"),
        (["bnbench.x:Y", "builtin", "--baseline-path", "."], "bnbench's own module"),
        (["m:BN", "builtin", "--baseline-path", "{file}/missing"], "not a directory"),
        (["builtin", "builtin", "--json", "{file}/ab.json"], "cannot write the output"),
        (["builtin", "builtin", "--threshold", "-1"], "--threshold"),
    ],
)
def test_usage_errors_exit_2_before_any_work(args, message, tmp_path):
    (tmp_path / "file").write_text("")  # a file where a directory would have to be
    done = in_process("ab", *(a.replace("{file}", str(tmp_path / "file")) for a in args))
    assert done.returncode == 2, done.stdout
    assert message in done.stdout + done.stderr


BASELINE_MODULE = textwrap.dedent("""
    from torch import nn
    from bnbench.registry import from_classes

    BN = from_classes("bn", {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d})
""")

# the pull request's version: twice the work, and it breaks on eval
CANDIDATE_MODULE = textwrap.dedent("""
    import os
    from ab_planted import Repeated1d, Repeated2d
    from bnbench.registry import from_classes

    class Eval2d(Repeated2d):
        def forward(self, x):
            if not self.training:
                raise RuntimeError("eval is broken")
            return super().forward(x)

    class Eval1d(Repeated1d):
        def forward(self, x):
            if not self.training and x.dim() == 2:
                os._exit(3)
            return super().forward(x)

    BN = from_classes("bn", {2: Eval1d, 3: Eval1d, 4: Eval2d})
""")


def test_a_real_interleaved_run_with_the_baseline_from_another_directory(tmp_path):
    main, pr = tmp_path / "main", tmp_path / "pr"
    main.mkdir()
    pr.mkdir()
    (main / "bnmod.py").write_text(BASELINE_MODULE)
    (pr / "bnmod.py").write_text(CANDIDATE_MODULE)
    out = tmp_path / "ab.json"
    done = bnbench(
        "ab",
        "bnmod:BN",
        "bnmod:BN",
        "--baseline-path",
        str(main),
        "--smoke",
        "--no-verify",
        "--json",
        str(out),
        cwd=pr,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    document = json.loads(out.read_text())
    assert document["baseline"]["file"] == str((main / "bnmod.py").resolve())
    assert document["candidate"]["file"] == str((pr / "bnmod.py").resolve())
    cases = {(c["mode"], c["shape"]): c for c in document["cases"]}
    assert len(cases) == len(SMOKE.rows())
    raised = cases[("forward_eval", "8x16x8x8")]
    assert (raised["status"], raised["side"]) == ("error", "candidate")
    assert "eval is broken" in raised["message"]
    crashed = cases[("forward_eval", "16x32")]
    assert (crashed["status"], crashed["side"]) == ("crashed", "candidate")
    assert "exit code 3" in crashed["message"]
    # the rest was compared, the train step after the crash by a fresh worker
    compared = [c for c in document["cases"] if c["status"] == "ok"]
    assert len(compared) == 4 and ("train_step", "16x1x8x8") in {
        (c["mode"], c["shape"]) for c in compared
    }
    for c in compared:
        assert c["pairs"] >= ab.PLANS["smoke"].min_pairs or c["verdict"] != "unsure"
        assert c["ci_low"] <= c["ratio"] <= c["ci_high"]
        assert len(c["baseline_samples"]) == c["pairs"] == len(c["candidate_samples"])
    assert document["summary"]["verdict"] == "slower"
    assert 1.3 < document["summary"]["ratio"] < 3.0
    assert document["ok"] is False and len(document["reasons"]) == 2
    assert "FAILED" in done.stdout and "geometric mean over 4 cases" in done.stdout


def test_a_baseline_path_without_the_module_is_a_usage_error(tmp_path):
    (tmp_path / "bnmod.py").write_text(BASELINE_MODULE)
    empty = tmp_path / "empty"
    empty.mkdir()
    done = bnbench(
        "ab", "bnmod:BN", "bnmod:BN", "--baseline-path", str(empty), "--smoke", cwd=tmp_path
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not from that directory" in done.stdout + done.stderr
    (empty / "bnmod.py").write_text("raise ImportError('this checkout is broken')\n")
    done = bnbench(
        "ab", "bnmod:BN", "bnmod:BN", "--baseline-path", str(empty), "--smoke", cwd=tmp_path
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "baseline:" in done.stderr and "this checkout is broken" in done.stderr
