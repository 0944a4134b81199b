"""The regression benchmark suite: benchmarks/suite.py behind ``payne-lite bench``.

The comparison logic is tested on small hand-made results (an injected regression
in each kind of metric must be flagged, a change within tolerance must pass); the
last test runs ``payne-lite bench --quick`` end to end against the committed
reference (that is how CI runs the suite: about 1.5-2 min on 2 cores; it is marked
``slow`` for information only, nothing skips it) and then shows that perturbing a
reference number makes the same results fail.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from payne_lite.cli import _bench, main

ROOT = Path(__file__).resolve().parents[1]
suite = _bench._bench_suite()  # the module the CLI runs
if suite is None:
    pytest.skip(
        f"{_bench.BENCH_SUITE} not found (not a repository checkout)",
        allow_module_level=True,
    )

Rule, metric = suite.Rule, suite.metric
SETUP = "payne_apogee/float32"


def make_results(mode: str = "quick", setup: str = SETUP) -> dict:
    """A small results dict in the suite's format, one metric of each kind."""
    m = {
        "emulator.teacher.median_abs_error": metric(
            1.0e-3, Rule("accuracy", "lower", rtol=0.2), what="median |error|"
        ),
        "fit.snr30.converged": metric(1.0, Rule("accuracy", "higher", atol=0.02)),
        "fit.snr30.lm_iter_median": metric(4.0, Rule("work", "lower", atol=1.0)),
        "fit.snr30.coverage_1sigma.Teff": metric(
            0.70, Rule("coverage", "nominal", atol=0.05, nominal=0.6827), param="Teff"
        ),
        "fit.snr30.coverage_1sigma.rv": metric(
            0.66, Rule("coverage", "nominal", atol=0.05, nominal=0.6827), param="rv"
        ),
        "fit.snr30.speedup_vs_baseline": metric(40.0, suite.SPEED_HIGHER, unit="x"),
        "mdn.inference_over_fit": metric(0.08, suite.SPEED_LOWER),
        "throughput.spectra_per_s": metric(5.0e4, suite.INFO, unit="1/s"),
    }
    meta = dict(
        mode=mode,
        date="2026-01-01T00:00:00+00:00",
        commit="abc1234",
        payne_lite="0.1.0",
        jax="0.10.1",
        devices=["cpu:0"],
        precision="float32",
        python="3.12",
        machine="x86_64",
        cpu_count=2,
        load_average_start=[0.5] * 3,
        load_average_end=[0.5] * 3,
        wall_seconds=60.0,
        emulator="test",
    )
    sections = {
        s: dict(status="ok", seconds=1.0)
        for s in ("emulator", "throughput", "fit", "mdn")
    }
    sections["posterior"] = dict(status="skipped", reason="issue 7", seconds=0.0)
    return dict(
        format=suite.RESULTS_FORMAT,
        version=suite.FORMAT_VERSION,
        meta=meta,
        setup=setup,
        notes=[],
        sections=sections,
        metrics=m,
        details={},
    )


def reference_with(results: dict, **values) -> dict:
    """The reference made from ``results``, some metric values replaced.

    Keyword names use ``__`` for the dots of metric names.
    """
    ref = suite.make_reference(copy.deepcopy(results), None)
    for key, value in values.items():
        ref["setups"][results["setup"]]["metrics"][key.replace("__", ".")]["value"] = (
            value
        )
    return ref


def status_of(comparison: dict, name: str) -> str:
    return next(r["status"] for r in comparison["rows"] if r["name"] == name)


# --- rules -----------------------------------------------------------------------
def test_rules_limits_and_words():
    acc = Rule("accuracy", "lower", rtol=0.2, atol=0.01)
    assert acc.limit(1.0) == pytest.approx(1.21)
    assert acc.passes(1.21, 1.0) and not acc.passes(1.22, 1.0)
    assert acc.describe() == "<= ref*1.2 + 0.01"
    hi = Rule("accuracy", "higher", atol=0.02)
    assert hi.passes(0.98, 1.0) and not hi.passes(0.97, 1.0)
    assert suite.SPEED_HIGHER.limit(40.0) == pytest.approx(20.0)
    assert suite.SPEED_LOWER.limit(0.08) == pytest.approx(0.16)
    assert suite.SPEED_HIGHER.describe() == ">= 0.5 x ref"
    cov = Rule("coverage", "nominal", atol=0.05, nominal=0.68)
    assert cov.passes(0.78, 0.75)  # 0.10 from nominal, allowed 0.07 + 0.05
    assert not cov.passes(0.81, 0.75)
    assert cov.passes(0.55, 0.55)  # unchanged, though off nominal
    assert suite.INFO.passes(-1.0, 1e9)  # never gated
    assert not acc.passes(math.nan, 1.0)  # a NaN result is a regression
    assert acc.passes(5.0, math.nan)  # ... but a NaN reference compares nothing
    with pytest.raises(ValueError, match="unknown kind"):
        Rule("fast")
    with pytest.raises(ValueError, match="nominal"):
        Rule("coverage", "nominal")
    assert Rule.from_dict(acc.to_dict()) == acc
    # an issue's target as the limit, whatever the reference (public predict: 36x)
    gate = suite.PUBLIC_PREDICT
    assert gate.limit(22.0) == gate.limit(80.0) == 36.0
    assert gate.passes(36.0, 80.0) and not gate.passes(35.9, 22.0)
    assert gate.describe() == ">= 36 (target)"
    assert Rule.from_dict(gate.to_dict()) == gate
    assert "floor" not in suite.SPEED_HIGHER.to_dict()
    with pytest.raises(ValueError, match="floor"):
        Rule("accuracy", "lower", floor=1.0)


def test_coverage_tolerance_is_twice_the_binomial_error():
    assert suite.coverage_atol(40) == pytest.approx(2 * math.sqrt(0.6827 * 0.3173 / 40))
    assert suite.coverage_atol(10**6) == 0.02


# --- comparison ------------------------------------------------------------------
def test_same_numbers_pass():
    res = make_results()
    c = suite.compare(res, suite.make_reference(copy.deepcopy(res), None))
    assert c["regressions"] == []
    assert c["n_compared"] == 7  # every metric but the info one
    assert status_of(c, "throughput.spectra_per_s") == "info"


@pytest.mark.parametrize(
    ("name", "ref_value", "flagged"),
    [
        # accuracy, lower is better, rtol 0.2: the run (1e-3) against a better ref
        ("emulator.teacher.median_abs_error", 0.9e-3, False),  # 11 % worse: within
        ("emulator.teacher.median_abs_error", 0.8e-3, True),  # 25 % worse: beyond
        ("emulator.teacher.median_abs_error", 2.0e-3, False),  # better: fine
        # work, atol 1 iteration (run: 4)
        ("fit.snr30.lm_iter_median", 3.0, False),
        ("fit.snr30.lm_iter_median", 2.5, True),
        # coverage (run: 0.70, nominal 0.6827, atol 0.05)
        ("fit.snr30.coverage_1sigma.Teff", 0.66, False),  # 0.017 -> 0.023 away
        ("fit.snr30.coverage_1sigma.Teff", 0.68, False),  # 0.003 -> 0.017: < 0.05
        ("fit.snr30.coverage_1sigma.Teff", 0.80, False),  # ref was worse
        # speed ratio, higher is better (run: 40x)
        ("fit.snr30.speedup_vs_baseline", 70.0, False),  # 0.57 of the ref: noise
        ("fit.snr30.speedup_vs_baseline", 80.0, False),  # exactly 0.5
        ("fit.snr30.speedup_vs_baseline", 90.0, True),  # halved and more
        # speed ratio, lower is better (run: 0.08)
        ("mdn.inference_over_fit", 0.05, False),
        ("mdn.inference_over_fit", 0.03, True),
        # info is never gated
        ("throughput.spectra_per_s", 1.0e9, False),
    ],
)
def test_injected_reference_change(name, ref_value, flagged):
    res = make_results()
    ref = reference_with(res, **{name.replace(".", "__"): ref_value})
    c = suite.compare(res, ref)
    assert (name in c["regressions"]) == flagged, c["rows"]
    assert len(c["regressions"]) == int(flagged)
    assert status_of(c, name) in (("REGRESSION",) if flagged else ("ok", "info"))


def test_worse_coverage_beyond_tolerance_is_flagged():
    res = make_results()
    ref = reference_with(res)
    res["metrics"]["fit.snr30.coverage_1sigma.rv"]["value"] = 0.55  # ref 0.66
    c = suite.compare(res, ref)
    assert c["regressions"] == ["fit.snr30.coverage_1sigma.rv"]
    res["metrics"]["fit.snr30.coverage_1sigma.rv"]["value"] = 0.69  # closer: fine
    assert suite.compare(res, ref)["regressions"] == []


def test_nan_result_is_a_regression():
    res = make_results()
    ref = reference_with(res)
    res["metrics"]["fit.snr30.converged"]["value"] = math.nan
    assert suite.compare(res, ref)["regressions"] == ["fit.snr30.converged"]


def test_missing_metric_error_and_skipped_sections():
    res = make_results()
    ref = reference_with(res)
    del res["metrics"]["fit.snr30.lm_iter_median"]  # its section ran: MISSING
    del res["metrics"]["mdn.inference_over_fit"]
    res["sections"]["mdn"] = dict(status="skipped", reason="no MDN", seconds=0.0)
    res["sections"]["throughput"] = dict(
        status="error", reason="ValueError: x", seconds=0.0
    )
    del res["metrics"]["throughput.spectra_per_s"]  # info: never MISSING
    c = suite.compare(res, ref)
    assert status_of(c, "fit.snr30.lm_iter_median") == "MISSING"
    assert status_of(c, "mdn.inference_over_fit") == "skipped"
    assert status_of(c, "throughput (section)") == "ERROR"
    assert sorted(c["regressions"]) == [
        "fit.snr30.lm_iter_median",
        "throughput (section)",
    ]


def test_other_setup_or_mode():
    res = make_results()
    ref = reference_with(make_results(setup="default_emulator/float32"))
    c = suite.compare(res, ref)
    assert c["regressions"] == [] and c["n_compared"] == 0
    assert "no results for setup 'payne_apogee/float32'" in c["note"]
    with pytest.raises(ValueError, match="mode 'full'"):
        suite.compare(res, reference_with(make_results(mode="full")))
    assert suite.compare(res, None)["note"] == "no reference: nothing compared"


def test_write_reference_keeps_sections_not_run():
    res = make_results()
    ref = reference_with(res)
    part = make_results()
    part["sections"] = {"fit": part["sections"]["fit"]}
    part["metrics"] = {k: v for k, v in part["metrics"].items() if k.startswith("fit.")}
    part["metrics"]["fit.snr30.converged"]["value"] = 0.99
    new = suite.make_reference(part, copy.deepcopy(ref))["setups"][SETUP]
    assert set(new["metrics"]) == set(res["metrics"])
    assert new["metrics"]["fit.snr30.converged"]["value"] == 0.99


def test_markdown_lists_regressions(tmp_path):
    res = make_results()
    ref = reference_with(res, emulator__teacher__median_abs_error=0.5e-3)
    c = suite.compare(res, ref)
    md = suite.markdown(res, c, tmp_path / "ref.json")
    assert "**1 regression(s)**: emulator.teacher.median_abs_error" in md
    assert "| emulator.teacher.median_abs_error | accuracy | 0.001 |" in md
    # per-label metrics share a summary row; pipes inside cells are escaped
    assert "Teff 0.7, rv 0.66" in md
    assert "median \\|error\\|" in md


# --- the command line ------------------------------------------------------------
def _write(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_cli_compare_exit_status(tmp_path, capsys):
    res = make_results()
    results = _write(tmp_path / "results.json", res)
    ok = _write(tmp_path / "ok.json", reference_with(res))
    bad = _write(
        tmp_path / "bad.json",
        reference_with(res, fit__snr30__speedup_vs_baseline=100.0),
    )
    assert main(["bench", "--compare", str(results), "--reference", str(ok)]) == 0
    assert "no regressions" in capsys.readouterr().out
    assert main(["bench", "--compare", str(results), "--reference", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION: fit.snr30.speedup_vs_baseline" in out
    code = main(
        [
            "bench",
            "--compare",
            str(results),
            "--reference",
            str(tmp_path / "absent.json"),
        ]
    )
    assert code == 2
    assert "absent.json not found" in capsys.readouterr().err


def test_cli_says_when_benchmarks_are_absent(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_bench, "BENCH_SUITE", tmp_path / "benchmarks" / "suite.py")
    _bench._bench_suite_or_error.cache_clear()
    try:
        assert main(["bench", "--quick"]) == 2
        err = capsys.readouterr().err
        assert "benchmarks/suite.py" in err and "pip install -e ." in err
        # a suite that does not load: bench says why, the other commands still work
        broken = tmp_path / "broken" / "suite.py"
        broken.parent.mkdir()
        broken.write_text("raise RuntimeError('half-edited')\n")
        monkeypatch.setattr(_bench, "BENCH_SUITE", broken)
        _bench._bench_suite_or_error.cache_clear()
        assert main(["bench", "--quick"]) == 2
        assert "does not load: RuntimeError: half-edited" in capsys.readouterr().err
        assert main(["--version"]) == 0
    finally:
        _bench._bench_suite_or_error.cache_clear()


def test_committed_references_are_valid():
    assert suite.REFERENCE["quick"].is_file()  # CI compares with it
    for mode, path in suite.REFERENCE.items():
        if not path.is_file():
            continue
        ref = suite.load_reference(path)
        assert ref["mode"] == mode
        assert ref["setups"], path
        for setup, entry in ref["setups"].items():
            assert entry["meta"]["mode"] == mode
            for name, m in entry["metrics"].items():
                Rule.from_dict(m)  # a valid rule
                assert name.split(".")[0] in suite.SECTIONS, name
                assert isinstance(m["value"], float), (setup, name)


# --- end to end: the quick suite as CI runs it -----------------------------------
#: The sections CI runs end to end (all but "posterior").
CI_SECTIONS = ("emulator", "throughput", "fit", "mdn")


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path, capsys):
    """``payne-lite bench --quick`` passes against the committed reference, and an
    injected regression in its reference makes the same results fail.

    CI runs every section but the posterior one (~2.5 of the suite's ~4 minutes:
    samplers run to an ESS target); its gates run in ``payne-lite bench --quick``
    itself, and the samplers' correctness is asserted in tests/test_sample.py."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["JAX_ENABLE_X64"] = "0"  # the references are float32
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "payne_lite",
            "bench",
            "--quick",
            "--no-progress",
            "--only",
            *CI_SECTIONS,
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1500,  # ~2 min
        env=env,
        check=False,
    )
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    res = json.loads((out / "results.json").read_text())
    assert res["comparison"]["regressions"] == [], log
    setup = res["setup"]
    assert sorted(res["sections"]) == sorted(CI_SECTIONS)
    for name in CI_SECTIONS:
        assert res["sections"][name]["status"] == "ok", (name, res["sections"][name])
    ref = suite.load_reference(suite.REFERENCE["quick"])
    assert setup in ref["setups"], f"no committed quick reference for {setup}"
    md = (out / "results.md").read_text()
    assert "**No regressions**" in md and "## Summary" in md

    # Inject: the reference had a tighter fit (scatter ratio 0.3 lower, beyond the
    # quick tolerance of 0.15) and a 4x higher speed ratio than this run (a ratio
    # to the 1-core baseline fails below 1/3 of the reference).
    m = ref["setups"][setup]["metrics"]
    scatter = "fit.snr30.scatter_ratio.Teff"
    speed = "fit.snr100.speedup_vs_baseline"
    m[scatter]["value"] = res["metrics"][scatter]["value"] - 0.3
    m[speed]["value"] = res["metrics"][speed]["value"] * 4
    bad = _write(tmp_path / "bad_reference.json", ref)
    code = main(
        ["bench", "--compare", str(out / "results.json"), "--reference", str(bad)]
    )
    assert code == 1
    text = capsys.readouterr().out.split("REGRESSION: ")[-1]
    assert sorted(text.split()[0:2]) == sorted([f"{speed},", scatter]), text
