"""Mapping errors found at load as one line; files kept inside the landing folder; personal data declared.

Each mapping error class gives its exact one-line message naming the mapping file and the key path; ``files``
cannot leave the landing folder (``..``, absolute paths, links out); an empty selection is a permanent
``MissingInputError``; ``email`` is personal by default; a text column that mostly holds e-mail addresses or
phone numbers and is not declared stops ingest, and no message ever quotes a personal value.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from crm_analytics.errors import InputError, MissingInputError, PersonalDataError
from crm_analytics.mapping import EntitySource, MappingError, load_mapping, select_files
from crm_analytics.privacy import (
    check_declared_personal_data,
    looks_like_email,
    looks_like_phone,
    personal_kind,
    sample_values,
    undeclared_personal_columns,
)
from tasks.common import DataQualityError, PermanentError, SourceSchemaError
from tasks.ingest import ingest_all, parse_entity

AS_OF = date(2025, 1, 31)
SECRET = "ann.secret@planted.example"
LINES = "order_id,customer_id,order_ts,product_id,quantity,unit_price\no1,c1,2025-01-02 10:00:00,p1,1,2.50\n"


def write_mapping(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my.yaml"
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(MappingError) as caught:
        load_mapping(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


ORDER_LINES = "entities:\n  order_lines:\n    files: o.csv\n"
COLUMNS = "canonical: customer_id, signup_date, country, gender, birth_year, email, channel; kept: none"

# (mapping text, the error after "mapping <file>: ")
MAPPING_ERRORS = {
    "invalid regex": (
        ORDER_LINES + "    regex_replace: {customer_id: {pattern: '('}}\n",
        "entities.order_lines.regex_replace.customer_id.pattern: invalid regex '(': missing ), unterminated "
        "subpattern at position 0"),
    "replacement naming an absent group": (
        ORDER_LINES + "    regex_replace: {customer_id: {pattern: 'a', repl: '\\2'}}\n",
        "entities.order_lines.regex_replace.customer_id.repl: invalid replacement '\\\\2': invalid group reference 2 "
        "at position 1"),
    "unknown time zone": (
        "timezone: Europe/Berlni\n" + ORDER_LINES,
        "timezone: unknown time zone 'Europe/Berlni': use an IANA name such as Europe/Berlin or UTC"),
    "format of a column that is not a timestamp": (
        ORDER_LINES + "    formats: {quantity: '%d'}\n",
        "entities.order_lines.formats.quantity: 'quantity' is typed int; formats are for timestamp columns"),
    "format without a % directive": (
        ORDER_LINES + "    formats: {order_ts: YYYY-MM-DD}\n",
        "entities.order_lines.formats.order_ts: format 'YYYY-MM-DD' has no % directive (a strptime format such as "
        "'%d.%m.%Y %H:%M')"),
    "format with a bad directive": (
        ORDER_LINES + "    formats: {order_ts: '%Y-%Q'}\n",
        "entities.order_lines.formats.order_ts: format '%Y-%Q': 'Q' is a bad directive in format '%Y-%Q'"),
    "format of an unknown column": (
        ORDER_LINES + "    formats: {order_time: '%Y'}\n",
        "entities.order_lines.formats.order_time: order_lines has no column 'order_time' (canonical: order_id, "
        "customer_id, order_ts, product_id, quantity, unit_price; kept: none)"),
    "pii typo": (
        ORDER_LINES + "  customers:\n    files: c.csv\n    pii: [emial]\n",
        f"entities.customers.pii: customers has no column 'emial' ({COLUMNS})"),
    "a key declared personal": (
        ORDER_LINES + "    pii: [customer_id]\n",
        "entities.order_lines.pii: 'customer_id' is a key joining the entities and cannot be pseudonymised (the joins "
        "would break): export a non-personal id"),
    "not_personal naming no column": (
        ORDER_LINES + "  customers:\n    files: c.csv\n    not_personal: [contact]\n",
        f"entities.customers.not_personal: customers has no column 'contact' ({COLUMNS})"),
    "a column both personal and not": (
        ORDER_LINES + "  customers:\n    files: c.csv\n    pii: [email]\n    not_personal: [email]\n",
        "entities.customers.not_personal: email also listed in pii"),
    "keep of a canonical column": (
        ORDER_LINES + "  customers:\n    files: c.csv\n    keep: [country]\n",
        "entities.customers.keep: 'country' is a canonical column of customers; keep is for extra columns"),
    "types of a column not kept": (
        ORDER_LINES + "  customers:\n    files: c.csv\n    types: {tenure: int}\n",
        "entities.customers.types.tenure: types apply to kept columns, and 'tenure' is not in keep"),
    "columns naming an unknown column": (
        ORDER_LINES + "  customers:\n    files: c.csv\n    columns: {custmer_id: Id}\n",
        f"entities.customers.columns.custmer_id: customers has no column 'custmer_id' ({COLUMNS})"),
    "defaults of an unknown column": (
        ORDER_LINES + "    defaults: {qty: 1}\n",
        "entities.order_lines.defaults.qty: order_lines has no column 'qty' (canonical: order_id, customer_id, "
        "order_ts, product_id, quantity, unit_price; kept: none)"),
    "compose of an unknown column": (
        ORDER_LINES + "    compose: {basket: [customer_id, order_ts]}\n",
        "entities.order_lines.compose.basket: order_lines has no column 'basket' (canonical: order_id, customer_id, "
        "order_ts, product_id, quantity, unit_price; kept: none)"),
    "derivation from a column the origin lacks": (
        ORDER_LINES + "  customers:\n    derive: {from: order_lines, columns: {country: 'mode:nation'}}\n",
        "entities.customers.derive.columns.country: order_lines has no column 'nation'"),
    "derivation from an entity without the key": (
        "entities:\n  customers: {files: c.csv}\n  churn_labels: {files: l.csv}\n  order_lines: {files: o.csv}\n"
        "  products:\n    derive: {from: customers, columns: {category: 'const:all'}}\n",
        "entities.products.derive.from: customers has no product_id column to derive products from"),
    "derivation of an entity without a key": (
        "entities:\n  customers: {files: c.csv}\n  churn_labels:\n    derive: {from: customers}\n",
        "entities.churn_labels.derive: only customers and products can be derived (one row per key)"),
    "an order-line option on customers": (
        ORDER_LINES + "  customers: {files: c.csv, cancellation_prefix: C}\n",
        "entities.customers.cancellation_prefix: only order_lines have it"),
    "absolute files": (
        "entities:\n  order_lines:\n    files: /etc/passwd\n",
        "entities.order_lines.files: '/etc/passwd' is an absolute path; files are relative to landing_dir (make "
        "landing_dir the folder that holds them)"),
    "files leaving the landing folder": (
        "entities:\n  order_lines:\n    files: ../../../../etc/passwd\n",
        "entities.order_lines.files: '../../../../etc/passwd' leaves the landing folder ('..'); files must be inside "
        "landing_dir"),
    "files leaving it from a subfolder": (
        "entities:\n  order_lines:\n    files: 'daily/../../x/*.csv'\n",
        "entities.order_lines.files: 'daily/../../x/*.csv' leaves the landing folder ('..'); files must be inside "
        "landing_dir"),
    "YAML syntax error": (
        "entities:\n  order_lines: {files: o.csv\n  customers: {files: c.csv}\n",
        "line 3, column 12: invalid YAML: expected ',' or '}', but got ':' (while parsing a flow mapping)"),
    "a key given twice": (
        "entities:\n  order_lines: {files: o.csv}\n  order_lines: {files: p.csv}\n",
        "line 3, column 3: invalid YAML: duplicate key 'order_lines'"),
    "an empty file": ("", "expected keys such as name, landing_dir and entities, got an empty file"),
    "several pydantic errors on one line": (
        "name: [x]\n" + ORDER_LINES + "    csv: {delimeter: ';'}\n    defaults: {quantity: [1]}\n",
        "name: Input should be a valid string; entities.order_lines.csv.delimeter: Extra inputs are not permitted; "
        "entities.order_lines.defaults.quantity: expected text, a whole number, a number or true or false"),
    "several column errors on one line": (
        ORDER_LINES + "    formats: {order_ts: YYYY}\n  customers:\n    files: c.csv\n    pii: [emial]\n",
        "entities.order_lines.formats.order_ts: format 'YYYY' has no % directive (a strptime format such as "
        f"'%d.%m.%Y %H:%M'); entities.customers.pii: customers has no column 'emial' ({COLUMNS})"),
}


@pytest.mark.parametrize("case", MAPPING_ERRORS, ids=list(MAPPING_ERRORS))
def test_each_mapping_error_is_one_line_naming_the_file_and_key(tmp_path, case):
    text, expected = MAPPING_ERRORS[case]
    path = write_mapping(tmp_path, text)
    assert load_error(path) == f"mapping {path}: {expected}"


def test_mapping_errors_are_permanent_and_the_error_classes_are_shared():
    assert issubclass(MappingError, PermanentError) and issubclass(MappingError, ValueError)
    assert issubclass(MissingInputError, InputError) and issubclass(MissingInputError, FileNotFoundError)
    assert issubclass(InputError, PermanentError) and issubclass(PersonalDataError, MappingError)
    from crm_analytics import errors
    assert (PermanentError, SourceSchemaError, DataQualityError) == (
        errors.PermanentError, errors.SourceSchemaError, errors.DataQualityError)


def test_valid_mappings_still_load_and_an_absolute_landing_dir_is_allowed(tmp_path):
    path = write_mapping(tmp_path, f"landing_dir: {tmp_path / 'exports'}\ntimezone: Europe/London\n" + ORDER_LINES
                         + "    formats: {order_ts: '%d/%m/%Y %H:%M'}\n    keep: [note]\n    types: {note: string}\n"
                         "    regex_replace: {customer_id: {pattern: '\\.0$'}}\n    not_personal: [note]\n")
    mapping = load_mapping(path)
    assert mapping.landing_path(Path("/elsewhere")) == tmp_path / "exports"
    for shipped in ("sample", "online_retail", "telco", "cdnow", "groceries"):
        load_mapping(shipped)


# ---- e-mail is personal by default ------------------------------------------------------------------------------
def test_email_is_personal_even_when_pii_forgets_it_unless_declared_not_personal(tmp_path):
    forgot = load_mapping(write_mapping(tmp_path, ORDER_LINES + "  customers:\n    files: c.csv\n    pii: []\n"))
    assert forgot.entities["customers"].pii == ["email"]
    assert forgot.entities["order_lines"].pii == []  # order lines have no email column
    derived = load_mapping(write_mapping(tmp_path, ORDER_LINES))  # customers derived from the order lines
    assert derived.entities["customers"].pii == ["email"]
    opted_out = load_mapping(write_mapping(
        tmp_path, ORDER_LINES + "  customers:\n    files: c.csv\n    not_personal: [email]\n"))
    assert opted_out.entities["customers"].pii == []


def test_parse_errors_never_quote_the_always_personal_email(tmp_path):
    # An e-mail kept on order lines and typed as a number (a wrong mapping): it fails to parse, and is named only.
    mapping = load_mapping(write_mapping(tmp_path, ORDER_LINES + "    keep: [email]\n    types: {email: int}\n"))
    assert mapping.entities["order_lines"].pii == ["email"]
    text = pd.DataFrame({"order_id": ["o1"], "customer_id": ["c1"], "order_ts": ["2025-01-02"], "product_id": ["p1"],
                         "quantity": ["x"], "unit_price": ["1"], "email": [SECRET],
                         "_source_file": ["o.csv"], "_source_line": [2]})
    out = parse_entity(text, "order_lines", mapping, "o.csv")
    assert out.loc[0, "_parse_errors"] == "quantity='x'; email=<redacted>"


# ---- files stay inside the landing folder ---------------------------------------------------------------------
@pytest.fixture
def landing(tmp_path) -> Path:
    folder = tmp_path / "landing"
    folder.mkdir()
    (folder / "o.csv").write_text(LINES)
    return folder


@pytest.fixture
def outside(tmp_path) -> Path:
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text(f"root:x:0:0:{SECRET}:/root:/bin/bash\n")
    return secret


def test_a_link_to_a_file_outside_the_landing_folder_is_refused_without_reading_it(landing, outside):
    (landing / "linked.csv").symlink_to(outside)
    with pytest.raises(InputError) as caught:
        select_files(landing, EntitySource(files="*.csv"), AS_OF, "order_lines")
    assert str(caught.value) == (f"order_lines: linked.csv (matched by files '*.csv') is a link to a file outside the "
                                 f"landing folder {landing}; only files inside it are read")
    assert SECRET not in str(caught.value) and "passwd" not in str(caught.value)


def test_a_linked_folder_outside_is_refused_and_links_inside_are_followed(landing, outside):
    (landing / "more").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(InputError, match="more/passwd .*outside the landing folder"):
        select_files(landing, EntitySource(files="more/*"), AS_OF, "order_lines")
    (landing / "same.csv").symlink_to(landing / "o.csv")
    assert [p.name for p in select_files(landing, EntitySource(files="*.csv"), AS_OF)] == ["o.csv", "same.csv"]


def test_a_landing_folder_reached_through_a_link_is_fine(tmp_path, landing):
    (tmp_path / "alias").symlink_to(landing, target_is_directory=True)
    assert [p.name for p in select_files(tmp_path / "alias", EntitySource(files="o.csv"), AS_OF)] == ["o.csv"]


def test_files_leaving_the_landing_folder_after_expanding_a_variable_are_refused(landing, monkeypatch):
    source = EntitySource(files="${EXPORT_GLOB}")
    for value in ("/etc/passwd", "../outside/passwd"):
        monkeypatch.setenv("EXPORT_GLOB", value)
        with pytest.raises(MappingError, match=rf"^order_lines: files: '{value}' (is an absolute|leaves the landing)"):
            select_files(landing, source, AS_OF, "order_lines")


def test_ingest_never_reads_outside_the_landing_folder(tmp_path, landing, outside):
    (landing / "c.csv").symlink_to(outside)
    path = write_mapping(tmp_path, f"landing_dir: {landing}\n" + ORDER_LINES + "  customers: {files: c.csv}\n")
    with pytest.raises(InputError, match=r"^customers: c\.csv \(matched by files 'c\.csv'\) is a link") as caught:
        ingest_all(load_mapping(path), tmp_path, AS_OF)
    assert SECRET not in str(caught.value)


# ---- a selection that matches nothing ------------------------------------------------------------------------
def test_a_glob_that_matches_nothing_is_one_permanent_line(tmp_path, landing):
    path = write_mapping(tmp_path, f"landing_dir: {landing}\nentities:\n  order_lines: {{files: 'orders_*.csv'}}\n")
    with pytest.raises(MissingInputError) as caught:
        ingest_all(load_mapping(path), tmp_path, AS_OF)
    assert str(caught.value) == f"order_lines: no file matches files 'orders_*.csv' under {landing}"
    assert isinstance(caught.value, PermanentError)
    with pytest.raises(MissingInputError, match=r"under .*/nowhere \(the folder does not exist\)$"):
        select_files(tmp_path / "nowhere", EntitySource(files="o.csv"), AS_OF)
    (landing / "orders").mkdir()
    with pytest.raises(MissingInputError, match=r"\('orders' is a folder: name its files, e.g. 'orders/\*\.csv'\)$"):
        select_files(landing, EntitySource(files="orders"), AS_OF)


def test_an_as_of_date_before_every_daily_file_names_the_earliest(landing):
    (landing / "daily").mkdir()
    for day in ("2025-01-03", "2025-01-02"):
        (landing / "daily" / f"{day}.csv").write_text(LINES)
    source = EntitySource(files="daily/*.csv", daily=True)
    with pytest.raises(MissingInputError) as caught:
        select_files(landing, source, date(2024, 12, 31), "order_lines")
    assert str(caught.value) == (f"order_lines: no file of files 'daily/*.csv' under {landing} is dated on or before "
                                 "2024-12-31 (the earliest is dated 2025-01-02)")
    assert [p.name for p in select_files(landing, source, date(2025, 1, 2))] == ["2025-01-02.csv"]


# ---- undeclared personal data ---------------------------------------------------------------------------------
NOT_PHONES = ["17850", "536365", "85123A", "C536379", "2010-12-01 08:26:00", "12345678", "2010-12-01", "01.12.2010",
              "12/01/2010", "12.345.678", "1 234 567", "192.168.100.200", "978-3-16-148410-0", "50000-75000",
              "0012345678", "0000012345", "17850.0", "+12.50", "-1234.5678", "CDNOW_master.txt|1", "3.14159265",
              "1,234,567.89", "2010-12-01T08:26:00+01:00", "C0000001", "O000000001"]
PHONES = ["+44 20 7946 0958", "+4930123456", "+1 (555) 123-4567", "0044 20 7946 0958", "00442079460958",
          "(030) 1234567", "(555) 123-4567", "030 1234567", "0171-1234567", "030/1234567", "555-123-4567",
          "555.123.4567", "1 555 123 4567", "+44 7700 900123"]


@pytest.mark.parametrize("value", PHONES)
def test_phone_numbers_are_recognised(value):
    assert looks_like_phone(value) and not looks_like_email(value)


@pytest.mark.parametrize("value", NOT_PHONES)
def test_ids_skus_prices_and_dates_are_not_phone_numbers(value):
    assert not looks_like_phone(value) and not looks_like_email(value)


def test_email_shapes():
    assert all(map(looks_like_email, [SECRET, "a@b.co", " x.y+tag@mail.example.org "]))
    assert not any(map(looks_like_email, ["a@b", "@b.com", "a b@c.com", "mailbox", "a@@b.com", "user@host.c"]))


def test_a_column_is_flagged_when_at_least_half_its_sample_looks_personal():
    emails = [f"p{i}@shop.example" for i in range(10)]
    assert personal_kind(emails[:5] + ["x"] * 5) == ("e-mail addresses", 5)
    assert personal_kind(emails[:4] + ["x"] * 6) is None
    assert personal_kind(["+44 20 7946 0958"] * 3 + ["x"]) == ("phone numbers", 3)
    assert personal_kind([]) is None


def test_the_sample_is_spread_over_the_column_and_skips_missing_values():
    values = pd.Series([None, *[str(i) for i in range(5000)]], dtype="string")
    sampled = sample_values(values)
    assert len(sampled) == 1000 and sampled[0] == "0" and sampled[-1] == "4999"
    assert sample_values(pd.Series(["a", None, "b"], dtype="string")) == ["a", "b"]


def test_the_message_names_column_kind_and_share_and_never_a_value():
    contact = [f"person{i}.{SECRET}" for i in range(998)] + ["n/a", "unknown"]
    frame = pd.DataFrame({"customer_id": [f"c{i}" for i in range(1000)], "contact": contact})
    problems = undeclared_personal_columns(frame, "customers", ["customer_id", "contact"])
    assert problems == ["customers.contact looks like e-mail addresses (998 of 1,000 sampled values) but is not in "
                        "pii: add it to entities.customers.pii, or to not_personal if it is not personal data"]
    assert "@" not in problems[0] and "planted" not in problems[0] and "secret" not in problems[0]


def _contacts(tmp_path: Path, landing: Path, extra: str, header: str, rows: list[str]) -> Path:
    (landing / "c.csv").write_text(header + "\n" + "".join(row + "\n" for row in rows))
    return write_mapping(tmp_path, f"landing_dir: {landing}\n" + ORDER_LINES + "  customers:\n    files: c.csv\n"
                         + extra)


def test_ingest_stops_on_an_undeclared_email_or_phone_column_without_quoting_it(tmp_path, landing):
    rows = [f"c{i},{SECRET.replace('ann', f'ann{i}')},+44 7700 900{i:03d}" for i in range(3)]
    path = _contacts(tmp_path, landing, "    keep: [contact, mobile]\n", "customer_id,contact,mobile", rows)
    with pytest.raises(PersonalDataError) as caught:
        ingest_all(load_mapping(path), tmp_path, AS_OF)
    message = str(caught.value)
    assert message == (
        "customers.contact looks like e-mail addresses (3 of 3 sampled values) but is not in pii: add it to "
        "entities.customers.pii, or to not_personal if it is not personal data; customers.mobile looks like phone "
        "numbers (3 of 3 sampled values) but is not in pii: add it to entities.customers.pii, or to not_personal if "
        "it is not personal data")
    assert "planted" not in message and "7700" not in message and isinstance(caught.value, PermanentError)


def test_declared_columns_pass_either_way(tmp_path, landing):
    rows = ["c1,ann@planted.example,+44 7700 900123,support@shop.example"]
    header = "customer_id,email,mobile,helpdesk"
    path = _contacts(tmp_path, landing, "    keep: [mobile, helpdesk]\n    pii: [mobile]\n    not_personal: "
                     "[helpdesk]\n", header, rows)  # email is personal without being listed
    frames, _ = ingest_all(load_mapping(path), tmp_path, AS_OF)
    assert frames["customers"]["helpdesk"].tolist() == ["support@shop.example"]


def test_key_columns_are_checked_too():
    mapping = load_mapping("sample")
    frames = {"order_lines": pd.DataFrame({"order_id": ["o1"], "customer_id": [SECRET], "product_id": ["p1"]})}
    with pytest.raises(PersonalDataError) as caught:
        check_declared_personal_data(frames, mapping)
    assert str(caught.value) == (
        "order_lines.customer_id looks like e-mail addresses (1 of 1 sampled values) but is not in pii: it is a key "
        "joining the entities, which pii cannot pseudonymise: export a non-personal id, or add it to "
        "entities.order_lines.not_personal to accept it")


def test_the_online_retail_layout_has_no_false_positive():
    mapping = load_mapping("online_retail")
    frame = pd.DataFrame({"order_id": ["536365", "C536379", "536366"], "customer_id": ["17850", None, "13047"],
                          "product_id": ["85123A", "POST", "22633"], "country": ["United Kingdom"] * 3,
                          "description": ["WHITE HANGING HEART T-LIGHT HOLDER", "POSTAGE", "HAND WARMER UNION JACK"]})
    check_declared_personal_data({"order_lines": frame}, mapping)  # no error


@pytest.mark.skipif(not os.environ.get("CRM_ONLINE_RETAIL_DIR") and not Path(
    __file__).resolve().parents[2].joinpath("shared/datasets/online_retail/by_day").is_dir(),
    reason="the Online Retail export is not available")
def test_the_online_retail_export_passes_unchanged(tmp_path):
    folder = os.environ.get("CRM_ONLINE_RETAIL_DIR") or str(
        Path(__file__).resolve().parents[2] / "shared/datasets/online_retail/by_day")
    frames, _ = ingest_all(load_mapping("online_retail"), tmp_path, date(2011, 12, 9), folder)
    assert len(frames["order_lines"]) == 541_909


def test_the_generated_sample_passes_unchanged(tmp_path):
    from crm_analytics.sample_data import GeneratorConfig, generate

    generate(GeneratorConfig(customers=300, seed=7, end_date=date(2025, 3, 31)), tmp_path)
    frames, _ = ingest_all(load_mapping("sample"), tmp_path, date(2025, 3, 31))
    assert len(frames["customers"]) >= 300


def test_the_readme_example_with_every_option_is_a_valid_mapping(tmp_path):
    """The README's complete mapping example loads as it is written (a user copies it)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("A complete example with every option")
    block = readme[readme.index("```yaml\n", start) + len("```yaml\n"):]
    block = block[:block.index("```")]
    path = tmp_path / "example.yaml"
    path.write_text(block)
    mapping = load_mapping(path)
    assert mapping.entities["customers"].not_personal == ["shop_code"]
    assert mapping.entities["customers"].pii == ["email"]
