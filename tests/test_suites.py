"""The compiled suite engine must fail exactly the rows Great Expectations fails, for the same reasons."""

import json
from datetime import date

import numpy as np
import pandas as pd
import pytest

from crm_analytics.mapping import load_mapping
from tasks import suites
from tasks.ingest import ingest_all
from tasks.suites import SuiteError, compilable, evaluate_suite, run_compiled, run_gx
from tasks.validate import load_suite, suite_parameters


def _as_sets(failures):
    return {reason: set(labels) for reason, labels in failures.items() if labels}


def _messy_frame(seed: int, rows: int = 400) -> pd.DataFrame:
    """Every dtype the canonical schema produces, with nulls, duplicates, edge values and a shuffled index."""
    rng = np.random.default_rng(seed)
    def with_nulls(values, dtype):
        series = pd.Series(values, dtype=dtype)
        return series.mask(rng.random(rows) < 0.1)
    frame = pd.DataFrame({
        "key": with_nulls(rng.integers(0, rows // 2, rows).astype(str), "string"),
        "code": with_nulls(rng.choice(["A1", "b2", "C3", "x", "A10"], rows), "string"),
        "qty": with_nulls(rng.integers(-3, 4, rows), "Int64"),
        "price": with_nulls(rng.choice([-1.0, 0.0, 0.5, 10.0, 1e6, 2e6], rows), "float64"),
        "ts": with_nulls(pd.to_datetime("2025-01-01", utc=True)
                         + pd.to_timedelta(rng.integers(0, 60, rows), unit="D"), "datetime64[us, UTC]"),
        "year": with_nulls(rng.choice([1890, 1950, 2000, 2030], rows), "Int64"),
    })
    frame.index = rng.permutation(np.arange(1000, 1000 + rows))  # labels, not positions, must come back
    return frame


def _expectations():
    def exp(kind, reason, **kwargs):
        return {"type": kind, "kwargs": kwargs, "meta": {"reason": reason}}
    return [
        exp("expect_column_values_to_not_be_null", "key missing", column="key"),
        exp("expect_column_values_to_be_null", "code present", column="code"),
        exp("expect_column_values_to_be_between", "qty range", column="qty", min_value=-2, max_value=2),
        exp("expect_column_values_to_be_between", "qty strict", column="qty", min_value=-2, max_value=2,
            strict_min=True, strict_max=True),
        exp("expect_column_values_to_be_between", "price min", column="price", min_value=0),
        exp("expect_column_values_to_be_between", "price max", column="price", max_value=1e6, strict_max=True),
        exp("expect_column_values_to_be_between", "ts before", column="ts", max_value={"$PARAMETER": "end"},
            strict_max=True),
        exp("expect_column_values_to_be_between", "ts after", column="ts", min_value="2025-01-15T00:00:00+00:00"),
        exp("expect_column_values_to_be_between", "year", column="year", min_value=1900,
            max_value={"$PARAMETER": "year"}),
        exp("expect_column_values_to_be_in_set", "code known", column="code", value_set=["A1", "b2", "x"]),
        exp("expect_column_values_to_be_in_set", "key known", column="key",
            value_set={"$PARAMETER": "known"}),
        exp("expect_column_values_to_not_be_in_set", "qty zero", column="qty", value_set=[0]),
        exp("expect_column_values_to_be_in_set", "key in big set", column="key", value_set={"$PARAMETER": "big"}),
        exp("expect_column_values_to_not_be_in_set", "key banned", column="key",
            value_set={"$PARAMETER": "banned"}),
        exp("expect_column_values_to_match_regex", "code shape", column="code", regex=r"^[A-Z]\d+$"),
        exp("expect_column_values_to_be_unique", "key unique", column="key"),
        exp("expect_compound_columns_to_be_unique", "pair unique", column_list=["key", "code"]),
    ]


PARAMETERS = {"end": pd.Timestamp("2025-02-10", tz="UTC"), "year": 2025,
              "known": [str(i) for i in range(0, 200, 3)],
              # larger than SMALL_VALUE_SET, mostly values the frame never holds: GX gets them cut to what occurs
              "big": [str(i) for i in range(0, 20_000, 2)], "banned": [str(i) for i in range(150, 5_000)]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_masks_fail_exactly_the_rows_gx_fails(seed):
    frame = _messy_frame(seed)
    suite = {"name": f"messy_{seed}", "expectations": _expectations()}
    assert all(compilable(e, frame) for e in suite["expectations"])
    ours, theirs = run_compiled(frame, suite, suite["expectations"], PARAMETERS), run_gx(frame, suite, PARAMETERS)
    assert _as_sets(ours) == _as_sets(theirs)
    assert len(_as_sets(theirs)) >= 14  # the data exercises nearly every expectation, so equality means something


def test_the_shipped_suites_agree_with_gx_on_every_row_of_generated_data(sample_root):
    frames, _ = ingest_all(load_mapping("sample"), sample_root, date(2025, 6, 30))
    valid_ids = {}
    for entity in ("customers", "products", "order_lines"):
        frame, suite = frames[entity], load_suite(entity)
        params = suite_parameters(date(2025, 6, 30), known_customer_ids=valid_ids.get("customers", []),
                                  known_product_ids=valid_ids.get("products", []))
        failures, evaluation = evaluate_suite(frame, suite, params, cross_check_rows=0)
        assert evaluation == {"engine": "compiled", "compiled_expectations": len(suite["expectations"]),
                              "gx_expectations": 0, "cross_checked_rows": 0}
        assert _as_sets(failures) == _as_sets(run_gx(frame, suite, params))
        if entity != "products":  # the generator plants dirty customers and order lines, not products
            assert failures, f"no dirty {entity} were found"
        key = {"customers": "customer_id", "products": "product_id"}.get(entity)
        if key:
            failed = {label for labels in failures.values() for label in labels}
            valid_ids[entity] = frame.loc[~frame.index.isin(list(failed)), key].dropna().tolist()


def test_expectations_the_compiler_cannot_translate_exactly_go_to_gx():
    frame = _messy_frame(3)
    mostly = {"type": "expect_column_values_to_be_between", "meta": {"reason": "price mostly"},
              "kwargs": {"column": "price", "min_value": 0, "mostly": 0.5}}
    lengths = {"type": "expect_column_value_lengths_to_be_between", "meta": {"reason": "code length"},
               "kwargs": {"column": "code", "min_value": 2}}
    suite = {"name": "mixed", "expectations": [*_expectations()[:3], mostly, lengths]}
    failures, evaluation = evaluate_suite(frame, suite, PARAMETERS, cross_check_rows=100)
    assert evaluation == {"engine": "compiled", "compiled_expectations": 3, "gx_expectations": 2,
                          "cross_checked_rows": 100}
    assert "code length" in failures and "price mostly" not in failures  # 'mostly' passes as GX decides
    assert _as_sets(failures) == _as_sets(run_gx(frame, suite, PARAMETERS))


def test_a_compiled_mask_that_drifts_from_gx_fails_the_run(monkeypatch):
    frame = _messy_frame(4)
    suite = {"name": "drift", "expectations": _expectations()[4:5]}  # price >= 0
    drifted = dict(suites.COLUMN_MASKS)
    drifted["expect_column_values_to_be_between"] = lambda column, kw: (column < 0.5).fillna(False).to_numpy()
    monkeypatch.setattr(suites, "COLUMN_MASKS", drifted)
    with pytest.raises(SuiteError, match=r"disagrees with Great Expectations on a sample of 100 rows: 'price min'"):
        evaluate_suite(frame, suite, PARAMETERS, cross_check_rows=100)


def test_a_missing_parameter_or_column_is_named():
    frame = _messy_frame(5)
    suite = {"name": "broken", "expectations": _expectations()[10:11]}
    with pytest.raises(SuiteError, match=r"needs parameter 'known'"):
        evaluate_suite(frame, suite, {}, cross_check_rows=0)
    typo = {"name": "typo", "expectations": [{"type": "expect_column_values_to_not_be_null",
                                              "kwargs": {"column": "kye"}}]}
    with pytest.raises(SuiteError, match=r"'kye'"):
        evaluate_suite(frame, typo, {}, cross_check_rows=0)


def test_the_gx_engine_is_still_selectable_and_agrees():
    frame = _messy_frame(6)
    suite = json.loads(json.dumps({"name": "both", "expectations": _expectations()}))
    compiled, _ = evaluate_suite(frame, suite, PARAMETERS, engine="compiled", cross_check_rows=0)
    gx, evaluation = evaluate_suite(frame, suite, PARAMETERS, engine="gx")
    assert evaluation["engine"] == "gx"
    assert _as_sets(compiled) == _as_sets(gx)


def test_membership_and_value_set_cutting_are_exact():
    frame = _messy_frame(7)
    big = PARAMETERS["big"]
    expected = [value is not pd.NA and value in set(big) for value in frame["key"]]
    assert suites._is_member(frame["key"], big).tolist() == expected
    suite = {"name": "cut", "expectations": [_expectations()[12]]}  # key in the big set
    cut = suites.shrink_value_sets(frame, suite, PARAMETERS)["expectations"][0]["kwargs"]["value_set"]
    assert set(cut) == set(frame["key"].dropna()) & set(big) and len(cut) < len(big) / 20
