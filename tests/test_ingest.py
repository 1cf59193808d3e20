from datetime import date

import numpy as np
import pandas as pd
import pytest

from crm_analytics.mapping import EntitySource, SourceMapping, load_mapping, select_files
from tasks.common import SourceSchemaError
from tasks.ingest import coerce_column, ingest_all, parse_entity, read_source_text


def _text(**columns):
    frame = pd.DataFrame(columns, dtype="string")
    frame["_source_file"] = "f.csv"
    frame["_source_line"] = range(2, len(frame) + 2)
    return frame


def test_coerce_int_accepts_whole_numbers_and_nulls_the_rest():
    out = coerce_column(pd.Series(["3", "3.0", " 7 ", "3.5", "two", None]), "int")
    assert out.tolist()[:3] == [3, 3, 7]
    assert out.isna().tolist() == [False, False, False, True, True, True]


def test_coerce_timestamp_localises_naive_values_to_the_mapping_timezone():
    out = coerce_column(pd.Series(["2025-01-01 10:00:00", "not a date"]), "timestamp", timezone="Europe/Berlin")
    assert out.iloc[0] == pd.Timestamp("2025-01-01 09:00:00", tz="UTC")
    assert pd.isna(out.iloc[1])


def test_coerce_timestamp_with_explicit_format():
    out = coerce_column(pd.Series(["12/1/2010 8:26"]), "timestamp", fmt="%m/%d/%Y %H:%M")
    assert out.iloc[0] == pd.Timestamp("2010-12-01 08:26", tz="UTC")


EDGE_NUMBERS = ["3", "3.0", " 7 ", "3.5", "two", None, "", "nan", "NaN", "inf", "-Infinity", "-1e3", "1E5", "1e400",
                "1e-400", "1_000", "0x10", ".5", "5.", "+5", "-.5e3", "1,5", "00012", "--5", "5e", "e5",
                "12345678901234567890", "0.1000000000000000055511151231257827"]


def _pandas_numbers(values: list) -> pd.Series:
    text = pd.Series(values, dtype="string").str.strip().replace("", pd.NA)
    number = pd.to_numeric(text, errors="coerce").astype("float64")
    return number.where(np.isfinite(number))  # "inf", "nan" and overflow are parse errors (issue 15)


def test_number_parsing_equals_pandas_to_numeric_on_edge_cases_and_random_values():
    rng = np.random.default_rng(7)
    randoms = (rng.standard_normal(20_000) * 10.0 ** rng.integers(-12, 14, 20_000)).tolist()
    values = EDGE_NUMBERS + [repr(v) for v in randoms] + [f"{v:.17g}" for v in randoms] + [f"{v:.2f}" for v in randoms]
    fast = coerce_column(pd.Series(values), "float")
    pd.testing.assert_series_equal(fast, _pandas_numbers(values), check_names=False)


def test_coerce_int_rejects_infinite_fractional_and_out_of_range_values():
    out = coerce_column(pd.Series(["inf", "-1e400", "2.5", "1e3", "nan", "12345678901234567890", "-9e18"]), "int")
    assert out.isna().tolist() == [True, True, True, False, True, True, False]
    assert out.iloc[3] == 1000 and out.iloc[6] == -9 * 10**18


EDGE_TIMESTAMPS = ["2025-01-01 10:00:00", "2025-01-01T10:00:00", "2025-01-01", "2025-01-01 10:00", "2025-01-01 10",
                   "2025-01-01 10:00:00.123", "2025-1-5 3:04:05", "20250101", "2025-02-30 10:00:00", "2025-13-01",
                   "2025-01-01 24:00:00", "2025-01-01 10:00:60", "2025-03-30 02:30:00", "2025-10-26 02:30:00",
                   "not a date", None, "", "2025-01-01T10:00:00.1234567"]


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin", "America/New_York"])
@pytest.mark.parametrize("values", [EDGE_TIMESTAMPS, [v for v in EDGE_TIMESTAMPS if v != "2025-02-30 10:00:00"],
                                    [v for v in EDGE_TIMESTAMPS[:7] if v]],
                         ids=["with an impossible date", "with other bad values", "all well-formed"])
def test_timestamp_parsing_equals_pandas_on_naive_text(values, timezone):
    expected = pd.to_datetime(pd.Series(values, dtype="string").str.strip().replace("", pd.NA), format="ISO8601",
                              errors="coerce").dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
    fast = coerce_column(pd.Series(values), "timestamp", timezone=timezone)
    pd.testing.assert_series_equal(fast, expected.dt.tz_convert("UTC").astype("datetime64[us, UTC]"),
                                   check_names=False)


def test_timestamps_with_offsets_keep_them_even_when_they_differ_and_mix_with_naive_ones():
    out = coerce_column(pd.Series(["2025-01-01 10:00:00+01:00", "2025-07-01 10:00:00+02:00", "2025-07-01T08:00:00Z",
                                   "2025-07-01 10:00:00", "2025-07-01"]), "timestamp", timezone="Europe/Berlin")
    assert out.tolist() == [pd.Timestamp("2025-01-01 09:00", tz="UTC"), pd.Timestamp("2025-07-01 08:00", tz="UTC"),
                            pd.Timestamp("2025-07-01 08:00", tz="UTC"), pd.Timestamp("2025-07-01 08:00", tz="UTC"),
                            pd.Timestamp("2025-06-30 22:00", tz="UTC")]


def test_parse_entity_records_each_unparseable_value_with_its_column():
    mapping = load_mapping("sample")
    text = _text(order_id=["o1", "o2"], customer_id=["c1", "c2"], order_ts=["2025-01-01 10:00:00", "31/02/2025"],
                 product_id=["p1", "p2"], quantity=["2", "two"], unit_price=["1.5", "2.0"])
    out = parse_entity(text, "order_lines", mapping)
    assert pd.isna(out.loc[0, "_parse_errors"])
    assert out.loc[1, "_parse_errors"] == "order_ts='31/02/2025'; quantity='two'"
    assert out["_source_line"].tolist() == [2, 3]


def test_parse_entity_renames_through_the_mapping():
    mapping = SourceMapping(entities={
        "customers": EntitySource(files="c.csv", columns={"customer_id": "CustomerID", "signup_date": "Joined"}),
        "products": EntitySource(files="p.csv"), "order_lines": EntitySource(files="o.csv")})
    out = parse_entity(_text(CustomerID=["17850"], Joined=["2011-01-05"]), "customers", mapping)
    assert out.loc[0, "customer_id"] == "17850"
    assert out.loc[0, "signup_date"] == pd.Timestamp("2011-01-05", tz="UTC")


def test_missing_required_column_is_a_permanent_error_naming_the_column():
    with pytest.raises(SourceSchemaError, match=r"lacks required column\(s\) 'order_ts'"):
        parse_entity(_text(order_id=["o1"], customer_id=["c1"], product_id=["p1"], quantity=["1"],
                           unit_price=["2.5"]), "order_lines", load_mapping("sample"), "order_lines.csv")


def test_read_csv_with_bom_semicolons_latin1_and_crlf(tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes("\ufeffid;name\r\n1;Caf\u00e9\r\n2;\"a;b\"\r\n".encode("utf-8"))
    source = EntitySource(files="export.csv", csv={"delimiter": ";"})
    frame = read_source_text(path, source)
    assert list(frame.columns[:2]) == ["id", "name"]
    assert frame["name"].tolist() == ["Caf\u00e9", "a;b"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,name\n1,Caf\u00e9\n".encode("latin-1"))
    frame = read_source_text(latin, EntitySource(files="latin.csv", csv={"encoding": "latin-1"}))
    assert frame["name"].tolist() == ["Caf\u00e9"]


def test_daily_files_after_the_as_of_date_are_not_read(tmp_path):
    for day in ("2025-01-01", "2025-01-02", "2025-01-03"):
        (tmp_path / f"{day}.csv").write_text("x\n1\n")
    source = EntitySource(files="*.csv", daily=True)
    assert [p.name for p in select_files(tmp_path, source, date(2025, 1, 2))] == ["2025-01-01.csv",
                                                                                   "2025-01-02.csv"]


def test_ingest_of_the_generated_export_keeps_every_row(sample_root):
    mapping = load_mapping("sample")
    frame = ingest_all(mapping, sample_root, date(2025, 12, 31))[0]["order_lines"]
    on_disk = sum(len(pd.read_csv(p, dtype=str)) for p in (sample_root / "landing" / "order_lines").glob("*.csv"))
    assert len(frame) == on_disk
    assert frame["_source_file"].str.startswith("order_lines/").all()


def _copy_export(sample_root, tmp_path):
    import shutil

    shutil.copytree(sample_root / "landing", tmp_path / "landing")
    return tmp_path


def test_incremental_read_equals_a_full_read(sample_root, tmp_path):
    from tasks.ingest import History

    root = _copy_export(sample_root, tmp_path)
    mapping = load_mapping("sample")
    yesterday, yesterday_sources = ingest_all(mapping, root, date(2025, 12, 30))
    history = {"order_lines": History(yesterday["order_lines"], yesterday_sources["order_lines"]["files"])}
    tonight, sources = ingest_all(mapping, root, date(2025, 12, 31), history=history)
    full, _ = ingest_all(mapping, root, date(2025, 12, 31))
    assert sources["order_lines"]["mode"] == "incremental" and sources["order_lines"]["new_files"] == 1
    for entity in full:
        pd.testing.assert_frame_equal(tonight[entity], full[entity])


def test_a_changed_or_late_old_file_forces_a_full_read(sample_root, tmp_path):
    from tasks.ingest import History

    root = _copy_export(sample_root, tmp_path)
    mapping = load_mapping("sample")
    yesterday, yesterday_sources = ingest_all(mapping, root, date(2025, 12, 30))
    history = {"order_lines": History(yesterday["order_lines"], yesterday_sources["order_lines"]["files"])}
    late = root / "landing" / "order_lines" / "2025-06-15.csv"   # an old day re-sent with one more line
    late.write_text(late.read_text() + "O999999999,C0000001,2025-06-15 10:00:00,P00001,1,2.50\n")
    tonight, sources = ingest_all(mapping, root, date(2025, 12, 31), history=history)
    assert sources["order_lines"]["mode"] == "full"
    assert (tonight["order_lines"]["order_id"] == "O999999999").sum() == 1


def test_parquet_sources_are_read_as_text_and_typed_like_csv(tmp_path):
    frame = pd.DataFrame({"id": [1, 2], "joined": ["2024-01-01", "not a date"]})
    frame.to_parquet(tmp_path / "customers.parquet")
    text = read_source_text(tmp_path / "customers.parquet", EntitySource(files="customers.parquet", format="parquet"))
    assert text["id"].tolist() == ["1", "2"] and text["_source_line"].tolist() == [2, 3]
    mapping = SourceMapping(entities={
        "customers": EntitySource(files="customers.parquet", format="parquet",
                                  columns={"customer_id": "id", "signup_date": "joined"}),
        "products": EntitySource(files="p.csv"), "order_lines": EntitySource(files="o.csv")})
    text["_source_file"] = "customers.parquet"
    parsed = parse_entity(text, "customers", mapping)
    assert parsed["signup_date"].iloc[0] == pd.Timestamp("2024-01-01", tz="UTC")
    assert parsed["_parse_errors"].iloc[1] == "signup_date='not a date'"
