"""Dirty files at the ingest edge (issue 15): encodings, other kinds of file, NUL bytes, headers, number formats,
blanks around values, and broken Parquet. Each case states its outcome: a row quarantined with its reason, or one
error line naming the file and line or column, whose text (and whatever it chains) holds no value of the file."""

import bz2
import gzip
import lzma
import zipfile
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.ingest.text_files as ingest
from crm_analytics.mapping import EntitySource, SourceMapping
from tasks.common import SourceSchemaError
from tasks.ingest import (
    check_text_file,
    coerce_column,
    column_report,
    parse_entity,
    read_files,
    read_source_text,
    source_columns,
)
from tasks.validate import load_suite, suite_parameters, validate_entity

PLANTED = "anna.planted@example.com"  # a personal value: it must never reach a message
AS_OF = date(2025, 1, 31)


def _leaks(exc: BaseException) -> list[str]:
    """Every text an error carries (message, args, and the errors it chains): where a planted value could hide."""
    texts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts += [str(exc), repr(exc.args)]
        exc = exc.__cause__ or exc.__context__
    return [t for t in texts if "planted@example.com" in t]  # every planted address ends so


def _one_line_error(call, *args) -> str:
    """The message of the SourceSchemaError ``call(*args)`` raises: one line, chaining nothing, leaking nothing."""
    with pytest.raises(SourceSchemaError) as caught:
        call(*args)
    assert _leaks(caught.value) == []
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    message = str(caught.value)
    assert "\n" not in message
    return message


def _customers(header: bytes = b"customer_id,email,country\n", rows: int = 3) -> bytes:
    lines = [f"C{i},{PLANTED.replace('anna', f'anna{i}')},DE\n".encode() for i in range(1, rows + 1)]
    return header + b"".join(lines)


def _mapping(customers: EntitySource) -> SourceMapping:
    return SourceMapping(entities={"customers": customers, "churn_labels": EntitySource(files="labels.csv")})


def _parsed(tmp_path: Path, content: bytes, name: str = "customers.csv", **source) -> pd.DataFrame:
    (tmp_path / name).write_bytes(content)
    mapping = _mapping(EntitySource(files=name, pii=["email"], **source))
    text = read_files("customers", mapping.entities["customers"], tmp_path, AS_OF)
    return parse_entity(text, "customers", mapping, name)


# ---- encodings -----------------------------------------------------------------------------------------------
def test_a_latin1_byte_in_a_utf8_file_is_one_line_with_its_line_and_offset(tmp_path):
    content = _customers() + "C4,Ren\u00e9e,FR\n".encode("latin-1") + _customers(b"", 2)
    path = tmp_path / "customers.csv"
    path.write_bytes(content)
    offset = content.index(b"\xe9")
    message = _one_line_error(check_text_file, path, EntitySource(files="customers.csv"))
    assert message == (f"{path} line 5 (byte offset {offset:,}): 0xe9 is not valid utf-8; set csv.encoding "
                       "(latin-1, cp1252, ...)")
    assert check_text_file(path, EntitySource(files="customers.csv", csv={"encoding": "latin-1"})) is None


@pytest.mark.parametrize("delimiter", [",", "whitespace"])
def test_reading_an_entity_checks_the_encoding_of_every_line_of_every_file(tmp_path, delimiter):
    (tmp_path / "a.csv").write_bytes(_customers().replace(b",", b" " if delimiter == "whitespace" else b","))
    bad = _customers(rows=300) + "C9,Ren\u00e9e,FR\n".encode("cp1252")
    (tmp_path / "b.csv").write_bytes(bad.replace(b",", b" ") if delimiter == "whitespace" else bad)
    source, offset = EntitySource(files="*.csv", csv={"delimiter": delimiter}), bad.index(b"\xe9")
    assert _one_line_error(read_files, "customers", source, tmp_path, AS_OF) == (
        f"{tmp_path / 'b.csv'} line 302 (byte offset {offset:,}): 0xe9 is not valid utf-8; set "
        "csv.encoding (latin-1, cp1252, ...)")


def test_a_bad_byte_in_the_header_fails_the_header_read_with_one_line_and_no_file_content(tmp_path):
    """The original leak: the header read decoded ~8 KB and its UnicodeDecodeError carried them all."""
    path = tmp_path / "customers.csv"
    path.write_bytes(b"customer_id,\xe9mail\n" + _customers(b"", 200))
    message = _one_line_error(source_columns, path, EntitySource(files="customers.csv"))
    assert message == (f"{path} line 1 (byte offset 12): 0xe9 is not valid utf-8; set csv.encoding (latin-1, "
                       "cp1252, ...)")
    path.write_bytes(b"customer_id,email\n" + _customers(b"", 200) + b"C9,\xe9,x\n")  # beyond the first 8 KB read
    message = _one_line_error(check_text_file, path, EntitySource(files="customers.csv"))
    assert f"{path} line 202 (byte offset " in message


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 22])
def test_the_scan_finds_the_same_byte_whatever_the_chunk_size_and_accepts_characters_cut_by_chunks(
        tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(ingest, "SCAN_BYTES", chunk)
    path = tmp_path / "customers.csv"
    good = "customer_id,name\r\nC1,J\u00fcrgen \u20ac\rC2,\U0001f600\n".encode()
    path.write_bytes(good)
    assert check_text_file(path, EntitySource(files="customers.csv")) is None
    path.write_bytes(good + b"C3,x\xff\n")
    assert f"{path} line 4 (byte offset {len(good) + 4}): 0xff" in _one_line_error(
        check_text_file, path, EntitySource(files="customers.csv"))
    path.write_bytes(good + b"C3,\xe2\x82")  # the file ends inside a three-byte character
    assert f"line 4 (byte offset {len(good) + 3}): 0xe2 is not valid utf-8" in _one_line_error(
        check_text_file, path, EntitySource(files="customers.csv"))


def test_cp1252_rejects_its_five_undefined_bytes_and_latin1_accepts_every_byte(tmp_path):
    path = tmp_path / "customers.csv"
    path.write_bytes(b"customer_id,name\nC1,\x80uro\nC2,\x81\n")
    assert "line 3 (byte offset 28): 0x81 is not valid cp1252" in _one_line_error(
        check_text_file, path, EntitySource(files="customers.csv", csv={"encoding": "cp1252"}))
    path.write_bytes(b"customer_id,name\n" + bytes(range(128, 256)) + b"\n")
    assert check_text_file(path, EntitySource(files="customers.csv", csv={"encoding": "latin-1"})) is None


@pytest.mark.parametrize(("codec", "bom", "said"), [
    ("utf-16-le", b"\xff\xfe", "is UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8"),
    ("utf-16-be", b"\xfe\xff", "is UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8"),
    ("utf-32-le", b"\xff\xfe\x00\x00", "is UTF-32 text (it starts with a UTF-32 byte-order mark): save it as UTF-8"),
    ("utf-16-le", b"", "has NUL bytes between its characters: it looks like UTF-16 or UTF-32 text; save it as UTF-8"),
])
def test_utf16_and_utf32_files_are_one_line_asking_for_utf8(tmp_path, codec, bom, said):
    """Decision: UTF-16/32 are not read (line counts and headers are read byte-wise, where a line break must be
    the byte \\n); the file gets one line, and a mapping declaring such an encoding fails when it loads."""
    path = tmp_path / "customers.csv"
    path.write_bytes(bom + _customers().decode().encode(codec))
    for call in (check_text_file, source_columns):
        assert _one_line_error(call, path, EntitySource(files="customers.csv")) == f"{path} {said}"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf_16_le", "cp500"])
def test_a_mapping_declaring_an_encoding_that_is_not_ascii_compatible_fails_when_it_loads(encoding):
    with pytest.raises(ValueError, match=f"csv encoding '{encoding}': only encodings that keep ASCII"):
        EntitySource(files="c.csv", csv={"encoding": encoding})
    with pytest.raises(ValueError, match="csv encoding 'utf-9': unknown encoding"):
        EntitySource(files="c.csv", csv={"encoding": "utf-9"})


def test_a_utf8_bom_is_read_under_utf8_and_named_under_another_encoding(tmp_path):
    path = tmp_path / "customers.csv"
    path.write_bytes(b"\xef\xbb\xbf" + _customers())
    assert source_columns(path, EntitySource(files="customers.csv")) == ["customer_id", "email", "country"]
    assert _one_line_error(source_columns, path, EntitySource(files="customers.csv", csv={"encoding": "cp1252"})) == (
        f"{path} starts with a UTF-8 byte-order mark, but csv.encoding is cp1252: set csv.encoding: utf-8")


# ---- other kinds of file -------------------------------------------------------------------------------------
def _zip(data: bytes) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", data)
    return buffer.getvalue()


def _parquet_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    pq.write_table(pa.table({"customer_id": ["C1"], "email": [PLANTED]}), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(("pack", "said"), [
    (gzip.compress, "is gzip-compressed, not text: decompress it into the landing folder"),
    (bz2.compress, "is bzip2-compressed, not text: decompress it into the landing folder"),
    (lzma.compress, "is xz-compressed, not text: decompress it into the landing folder"),
    (_zip, "is a zip archive (an Excel .xlsx file is one), not text: extract it, or save the sheet as CSV"),
    (lambda data: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + data, "is an Excel .xls file, not text: save the sheet as CSV"),
    (lambda data: _parquet_bytes(), "is a Parquet file, not text: set format: parquet for this entity"),
])
@pytest.mark.parametrize("name", ["customers.csv", "customers.csv.gz"])
def test_a_compressed_parquet_or_excel_file_is_one_line_saying_what_it_is(tmp_path, pack, said, name):
    """Decision: compressed files are not read, .csv.gz included (the independent line count and the encoding
    check read the bytes on disk); the line says what the file is and what to do."""
    path = tmp_path / name
    path.write_bytes(pack(_customers(rows=400)))
    source = EntitySource(files=name)
    assert _one_line_error(check_text_file, path, source).startswith(f"{path} {said}")
    assert _one_line_error(read_files, "customers", source, tmp_path, AS_OF).startswith(f"{path} {said}")


# ---- NUL bytes -----------------------------------------------------------------------------------------------
def test_a_nul_byte_in_a_value_quarantines_its_row_naming_the_column(tmp_path):
    content = b"customer_id,email,country\nC1,a@example.com,DE\nC2,anna\x00planted@example.com,D\x00E\nC3,,FR\n"
    parsed = _parsed(tmp_path, content)
    assert parsed["_parse_errors"].tolist()[1] == "country=<NUL byte>; email=<NUL byte>"  # in column order
    assert parsed["_parse_errors"].notna().tolist() == [False, True, False]
    assert not parsed.drop(columns="_parse_errors").astype("string").apply(
        lambda column: column.str.contains("\x00", regex=False).fillna(False)).any().any()
    outcome = validate_entity(parsed, load_suite("customers"), suite_parameters(AS_OF), personal=["email"])
    assert outcome.quarantine["customer_id"].tolist() == ["C2"]
    assert outcome.quarantine["_quarantine_reason"].iloc[0] == ("a value does not parse as its declared type: "
                                                                "country=<NUL byte>; email=<NUL byte>")
    assert outcome.quarantine["_parse_errors"].iloc[0] == "country=<NUL byte>; email=<NUL byte>"
    assert outcome.valid["customer_id"].tolist() == ["C1", "C3"]


def test_a_nul_byte_in_the_header_is_one_line(tmp_path):
    path = tmp_path / "customers.csv"
    path.write_bytes(b"customer_id,em\x00ail,country\n" + _customers(b""))
    assert _one_line_error(source_columns, path, EntitySource(files="customers.csv")) == (
        f"{path}: the header line has NUL bytes (a binary file, or UTF-16 text?)")


# ---- headers -------------------------------------------------------------------------------------------------
def test_duplicate_header_names_are_one_line_naming_them_and_their_positions(tmp_path):
    path = tmp_path / "customers.csv"
    path.write_bytes(_customers(b"customer_id,email,country,email,Country,country\n"))
    assert _one_line_error(read_files, "customers", EntitySource(files="customers.csv"), tmp_path, AS_OF) == (
        f"{path}: the header has duplicate column names: 'email' (columns 2, 4); 'country' (columns 3, 6); "
        "rename them")


def test_an_empty_header_cell_becomes_unnamed_n_and_is_reported_as_unused(tmp_path):
    """Decision: an empty header cell (an index column, a trailing delimiter) is no error: its column is named
    ``unnamed_<position>`` so a mapping can use it, and is otherwise listed in ``unused_columns``."""
    path = tmp_path / "customers.csv"
    path.write_bytes(b",customer_id,country,\n0,C1,DE,\n1,C2,FR,\n")
    mapping = _mapping(EntitySource(files="customers.csv"))
    assert source_columns(path, mapping.entities["customers"]) == ["unnamed_1", "customer_id", "country",
                                                                   "unnamed_4"]
    report, _ = column_report("customers", mapping, path)
    assert report == {"renamed_columns": {}, "unused_columns": ["unnamed_1", "unnamed_4"]}
    parsed = _parsed(tmp_path, path.read_bytes())
    assert parsed["customer_id"].tolist() == ["C1", "C2"] and parsed["country"].tolist() == ["DE", "FR"]


def test_a_column_whose_header_changed_case_or_gained_blanks_is_used_with_a_warning_and_a_metric(tmp_path):
    content = b"Customer_ID, Country ,email,Notes\nC1,DE,a@example.com,x\nC2,FR,b@example.com,y\n"
    parsed = _parsed(tmp_path, content, columns={"email": "EMAIL"})
    assert parsed["customer_id"].tolist() == ["C1", "C2"]
    assert parsed["country"].tolist() == ["DE", "FR"]  # was silently null for every customer
    assert parsed["email"].notna().all()
    mapping = _mapping(EntitySource(files="customers.csv", columns={"email": "EMAIL"}))
    report, warnings = column_report("customers", mapping, tmp_path / "customers.csv")
    assert report == {"renamed_columns": {"customer_id": "Customer_ID", "country": " Country ", "EMAIL": "email"},
                      "unused_columns": ["Notes"]}
    path = tmp_path / "customers.csv"
    assert warnings[:3] == [
        f"customers: {path} has no column 'customer_id' but has 'Customer_ID'; using it (map it in columns: to "
        "silence this)",
        f"customers: {path} has no column 'country' but has ' Country '; using it (map it in columns: to silence "
        "this)",
        f"customers: {path} has no column 'EMAIL' but has 'email'; using it (map it in columns: to silence this)"]
    assert warnings[3] == (f"customers: {path} has no column for optional ['signup_date', 'gender', 'birth_year', "
                           "'channel'] (left empty), but has columns nothing uses: ['Notes']; map one in columns: "
                           "if it is meant")


def test_two_columns_matching_a_name_when_case_is_ignored_are_an_error_naming_both(tmp_path):
    path = tmp_path / "customers.csv"
    path.write_bytes(b"customer_id,Country,COUNTRY \nC1,DE,FR\n")
    message = _one_line_error(_parsed, tmp_path, path.read_bytes())
    assert message == ("customers: customers.csv (columns.country): no column 'country', and ['Country', "
                       "'COUNTRY '] all match it when case and blanks are ignored; map one of them in columns:")


def test_an_exact_name_wins_over_other_spellings_and_nothing_is_reported(tmp_path):
    parsed = _parsed(tmp_path, b"customer_id,country,Country\nC1,DE,FR\n")
    assert parsed["country"].tolist() == ["DE"]
    report, warnings = column_report("customers", _mapping(EntitySource(files="customers.csv")),
                                     tmp_path / "customers.csv")
    assert report == {"renamed_columns": {}, "unused_columns": ["Country"]}
    assert len(warnings) == 1 and "nothing uses: ['Country']" in warnings[0]


def test_a_file_using_every_column_gets_no_warning(tmp_path):
    path = tmp_path / "customers.csv"
    path.write_bytes(b"customer_id,signup_date,country,gender,birth_year,email,channel\n")
    assert column_report("customers", _mapping(EntitySource(files="customers.csv")), path) == (
        {"renamed_columns": {}, "unused_columns": []}, [])


# ---- numbers -------------------------------------------------------------------------------------------------
def test_thousands_separators_and_decimal_commas_need_the_mapping_to_say_so():
    values = pd.Series(["1,234.50", "12,99", "1234.5", "7"])
    assert coerce_column(values, "float").tolist()[2:] == [1234.5, 7.0]
    assert coerce_column(values, "float").isna().tolist() == [True, True, False, False]
    assert coerce_column(values, "float", thousands=",").tolist()[:1] == [1234.5]
    assert coerce_column(values, "float", thousands=",").isna().tolist() == [False, True, False, False]
    german = pd.Series(["1.234,50", "12,99", "1.234", "12.99", "-,5", "1,5e3", "1.23,4"])
    out = coerce_column(german, "float", decimal=",", thousands=".")
    assert out.tolist()[:6] == [1234.5, 12.99, 1234.0, pytest.approx(np.nan, nan_ok=True), -0.5, 1500.0]
    assert out.isna().tolist() == [False, False, False, True, False, False, True]
    french = pd.Series(["1 234,5", "1\u00a0234,5", "1\u202f234", "12 34", "1234,5"])
    out = coerce_column(french, "float", decimal=",", thousands=" ")
    assert out.tolist()[:3] == [1234.5, 1234.5, 1234.0] and out.iloc[4] == 1234.5 and pd.isna(out.iloc[3])
    swiss = coerce_column(pd.Series(["1'234'567", "1'234.5", "12'34"]), "int", thousands="'")
    assert swiss.tolist()[0] == 1234567 and swiss.isna().tolist() == [False, True, True]


def test_number_options_apply_to_the_entitys_int_and_float_columns_and_failures_name_the_column(tmp_path):
    content = b"product_id;category;list_price\nP1;a;1.234,50\nP2;b;12,99\nP3;c;12.99\nP4;d;inf\n"
    (tmp_path / "products.csv").write_bytes(content)
    for options, prices, errors in [
        ({"delimiter": ";", "decimal": ",", "thousands": "."}, [1234.5, 12.99, None, None],
         [None, None, "list_price='12.99'", "list_price='inf'"]),
        ({"delimiter": ";"}, [None, None, 12.99, None],
         ["list_price='1.234,50'", "list_price='12,99'", None, "list_price='inf'"]),
    ]:
        mapping = SourceMapping(entities={"customers": EntitySource(files="c.csv"),
                                          "products": EntitySource(files="products.csv", csv=options),
                                          "order_lines": EntitySource(files="o.csv")})
        text = read_files("products", mapping.entities["products"], tmp_path, AS_OF)
        parsed = parse_entity(text, "products", mapping, "products.csv")
        assert parsed["list_price"].astype(object).where(parsed["list_price"].notna(), None).tolist() == prices
        assert parsed["_parse_errors"].astype(object).where(parsed["_parse_errors"].notna(), None).tolist() == errors
        assert parsed["product_id"].tolist() == ["P1", "P2", "P3", "P4"]  # text columns are left as they are


def test_the_same_separator_for_thousands_and_decimals_fails_when_the_mapping_loads():
    with pytest.raises(ValueError, match="csv thousands ',' is also the decimal mark"):
        EntitySource(files="p.csv", csv={"decimal": ",", "thousands": ","})


@pytest.mark.parametrize("text", ["inf", "-inf", "Infinity", "-Infinity", "nan", "NaN", "1e400", "-1e400"])
def test_non_finite_numbers_are_parse_errors_for_int_and_float_columns(text):
    assert coerce_column(pd.Series([text, "2.5"]), "float").isna().tolist() == [True, False]
    assert coerce_column(pd.Series([text, "2"]), "int").isna().tolist() == [True, False]


def test_scientific_notation_is_read_when_the_value_fits_the_type():
    assert coerce_column(pd.Series(["1e3", "1E3", "-2e2", "1.5e0", "2.5E2", "1e-3"]), "int").tolist() == [
        1000, 1000, -200, pd.NA, 250, pd.NA]
    assert coerce_column(pd.Series(["2.5E2", "1e3", "-1.5e-1"]), "float").tolist() == [250.0, 1000.0, -0.15]


def test_integers_are_exact_up_to_18_digits_and_fractions_are_never_rounded_away():
    out = coerce_column(pd.Series(["12345678901234567", "+12", "-000", "1000000.5", "1234567890123456789",
                                   "3.0", "1e18"]), "int")
    assert out.tolist()[:3] == [12345678901234567, 12, 0]  # through float64 the first would be ...568
    assert out.isna().tolist() == [False, False, False, True, True, False, False]
    assert out.iloc[6] == 10**18


def test_a_number_gets_the_same_value_through_the_arrow_and_the_pandas_path():
    """Plain numbers go through Arrow; "0x10", "1_000" or "inf" in the same column go through pandas: a plain
    value's result must not change with its neighbours."""
    plain = ["1e3", "2.5", "-7", ".5", "5."]
    alone = coerce_column(pd.Series(plain), "float")
    mixed = coerce_column(pd.Series(plain + ["0x10", "1_000", "inf"]), "float")
    assert alone.tolist() == mixed.tolist()[:5] and mixed.iloc[5:].isna().all()
    assert coerce_column(pd.Series(plain[:3]), "int").tolist() == coerce_column(
        pd.Series(plain[:3] + ["inf"]), "int").tolist()[:3]


# ---- blanks around values ------------------------------------------------------------------------------------
def test_tabs_and_non_breaking_spaces_around_ids_and_values_are_stripped(tmp_path):
    """Decision: a non-breaking space (U+00A0, and U+202F, U+2007) is blank like a space: it is Unicode white
    space, spreadsheets pad with it, and an id "C1\\u00a0" that is not "C1" would silently miss every join."""
    content = "customer_id,country,birth_year\n C1\t,\u00a0DE\u00a0,\t1980 \n\u00a0C2\u202f, FR,\u2007 1990\n"
    parsed = _parsed(tmp_path, content.encode())
    assert parsed["customer_id"].tolist() == ["C1", "C2"]
    assert parsed["country"].tolist() == ["DE", "FR"]
    assert parsed["birth_year"].tolist() == [1980, 1990] and parsed["_parse_errors"].isna().all()


def test_a_value_of_blanks_only_is_missing_not_an_error(tmp_path):
    parsed = _parsed(tmp_path, "customer_id,country,birth_year\nC1,\u00a0,\t\n".encode())
    assert parsed["country"].isna().all() and parsed["birth_year"].isna().all()
    assert parsed["_parse_errors"].isna().all()


# ---- Parquet ---------------------------------------------------------------------------------------------------
def _parquet(tmp_path: Path, table: pa.Table) -> Path:
    path = tmp_path / "customers.parquet"
    pq.write_table(table, path)
    return path


def test_a_parquet_column_whose_type_cannot_hold_its_canonical_type_is_one_line(tmp_path):
    path = _parquet(tmp_path, pa.table({"customer_id": pa.array([1, 2]), "signup_date": pa.array([1700000000, 3]),
                                        "email": [PLANTED, "b@example.com"]}))
    source = EntitySource(files="customers.parquet", format="parquet")
    assert _one_line_error(read_files, "customers", source, tmp_path, AS_OF) == (
        f"customers: {path}: column 'signup_date' (mapped to signup_date, a timestamp) is int64 in the Parquet "
        "file, which cannot be read as a timestamp")


def test_a_parquet_list_column_is_one_line_when_mapped_and_left_aside_when_not(tmp_path):
    table = pa.table({"customer_id": pa.array([[1], [2]]), "tags": pa.array([["a"], ["b"]])})
    path = _parquet(tmp_path, table)
    source = EntitySource(files="customers.parquet", format="parquet")
    assert _one_line_error(read_files, "customers", source, tmp_path, AS_OF) == (
        f"customers: {path}: column 'customer_id' (mapped to customer_id, a string) is list<element: int64> in the "
        "Parquet file, which cannot be read as a string")
    _parquet(tmp_path, table.set_column(0, "customer_id", pa.array([1, 2])))
    text = read_files("customers", source, tmp_path, AS_OF)
    assert text["customer_id"].tolist() == ["1", "2"] and text["tags"].isna().all()


def test_parquet_numbers_and_times_of_fitting_types_are_read(tmp_path):
    _parquet(tmp_path, pa.table({
        "customer_id": pa.array([17850, 13047]), "birth_year": pa.array([1980.0, None]),
        "signup_date": pa.array([date(2024, 1, 1), date(2024, 2, 1)]), "email": [PLANTED, None]}))
    mapping = _mapping(EntitySource(files="customers.parquet", format="parquet", csv={"decimal": ","}))
    text = read_files("customers", mapping.entities["customers"], tmp_path, AS_OF)
    parsed = parse_entity(text, "customers", mapping, "customers.parquet")
    assert parsed["customer_id"].tolist() == ["17850", "13047"]
    assert parsed["birth_year"].tolist() == [1980, pd.NA]  # csv.decimal does not apply to Parquet numbers
    assert parsed["signup_date"].iloc[1] == pd.Timestamp("2024-02-01", tz="UTC")


@pytest.mark.parametrize(("damage", "said"), [
    (lambda data: data[: len(data) // 2], "is not a readable Parquet file (damaged, truncated, or another format)"),
    (lambda data: _customers(), "is not a readable Parquet file (damaged, truncated, or another format)"),
    (lambda data: gzip.compress(data), "is gzip-compressed, not Parquet"),
    (lambda data: data[:4] + b"\xff" * 40 + data[44:], "is a damaged Parquet file: its rows cannot be read"),
])
def test_a_damaged_or_mislabelled_parquet_file_is_one_line(tmp_path, damage, said):
    path = _parquet(tmp_path, pa.table({"customer_id": ["C1", "C2"], "email": [PLANTED, PLANTED]}))
    path.write_bytes(damage(path.read_bytes()))
    source = EntitySource(files="customers.parquet", format="parquet")
    message = _one_line_error(read_files, "customers", source, tmp_path, AS_OF)
    assert message.startswith(f"{path} {said}")


def test_a_parquet_binary_column_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    path = _parquet(tmp_path, pa.table({"customer_id": ["C1"], "email": pa.array([b"\xe9" + PLANTED.encode()])}))
    source = EntitySource(files="customers.parquet", format="parquet")
    assert _one_line_error(read_source_text, path, source) == (
        f"{path}: column 'email' (binary) cannot be read as text (binary data that is not UTF-8?)")


def test_column_names_of_a_headerless_file_given_twice_or_blank_fail_when_the_mapping_loads():
    with pytest.raises(ValueError, match=r"csv column_names: \['a', 'b'\] given twice or blank"):
        EntitySource(files="c.csv", csv={"header": False, "column_names": ["a", "b", "a", "b", "c"]})
    with pytest.raises(ValueError, match=r"csv column_names: \[' '\] given twice or blank"):
        EntitySource(files="c.csv", csv={"header": False, "column_names": ["a", " "]})


def test_a_numeric_default_from_the_mapping_is_read_whatever_the_files_decimal_mark(tmp_path):
    (tmp_path / "o.csv").write_bytes(b"order;customer;ts;product;qty\nO1;C1;2025-01-02;P1;1.000\n")
    mapping = SourceMapping(entities={"order_lines": EntitySource(
        files="o.csv", csv={"delimiter": ";", "decimal": ",", "thousands": "."}, defaults={"unit_price": 2.5},
        columns={"order_id": "order", "customer_id": "customer", "order_ts": "ts", "product_id": "product",
                 "quantity": "qty"})})
    text = read_files("order_lines", mapping.entities["order_lines"], tmp_path, AS_OF)
    parsed = parse_entity(text, "order_lines", mapping, "o.csv")
    assert parsed["quantity"].tolist() == [1000]  # the file's "1.000" in its own format
    assert parsed["unit_price"].tolist() == [2.5]  # the mapping's 2.5 in YAML's
    assert parsed["_parse_errors"].isna().all()


def test_the_ingest_stage_records_renamed_and_unused_columns_and_logs_the_warnings(tmp_path, caplog):
    from crm_analytics.parameters import RunSpec
    from tasks.ingest import ingest as ingest_stage

    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "customers.csv").write_text(f"Customer_ID,email,Land\nC1,{PLANTED},DE\n")
    (tmp_path / "landing" / "labels.csv").write_text("customer_id,churned\nC1,false\n")
    (tmp_path / "m.yaml").write_text("entities:\n  customers: {files: customers.csv, pii: [email]}\n"
                                     "  churn_labels: {files: labels.csv}\n")
    with caplog.at_level("WARNING"):
        result = ingest_stage.fn(RunSpec(data_root=tmp_path, as_of=AS_OF), str(tmp_path / "m.yaml"))
    metrics = result.metrics["entities"]
    assert metrics["customers"]["renamed_columns"] == {"customer_id": "Customer_ID"}
    assert metrics["customers"]["unused_columns"] == ["Land"]
    assert metrics["churn_labels"]["renamed_columns"] == {} and metrics["churn_labels"]["unused_columns"] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("has no column 'customer_id' but has 'Customer_ID'; using it" in w for w in warnings)
    assert any("nothing uses: ['Land']" in w for w in warnings)
    assert not any(PLANTED in w for w in warnings)


def test_a_file_without_its_header_line_shows_no_value_when_its_columns_are_named(tmp_path):
    """A header line that is really a data row makes column "names" of values: those that look like values
    (e-mails, numbers, dates, phones) are shown as <value?>, with the likely cause."""
    path = tmp_path / "customers.csv"
    path.write_bytes(f"C1,{PLANTED},1980-02-03,+49 30 1234567,DE\n".encode() + _customers(b""))
    message = _one_line_error(read_files, "customers", EntitySource(files="customers.csv"), tmp_path, AS_OF)
    assert message == (f"customers: {path} lacks required column(s) ['customer_id']; it has ['C1', '<value?>', "
                       "'<value?>', '<value?>', 'DE'] (the first line looks like data: for a file without a header "
                       "set csv.header: false and csv.column_names)")
    (tmp_path / "a.csv").write_bytes(b"customer_id,email\nC0,x\n")
    (tmp_path / "b.csv").write_bytes(f"customer_id,{PLANTED}\nC1,y\n".encode())
    message = _one_line_error(read_files, "customers", EntitySource(files="[ab].csv"), tmp_path, AS_OF)
    assert message.startswith(f"customers: {tmp_path / 'b.csv'} has columns ['<value?>', 'customer_id'] (the first")
    path.write_bytes(f"customer_id,{PLANTED},{PLANTED}\n".encode())
    message = _one_line_error(source_columns, path, EntitySource(files="customers.csv"))
    assert message == f"{path}: the header has duplicate column names: <value?> (columns 2, 3); rename them"
