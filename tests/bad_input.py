"""The bad-input corpus: a small clean export with planted personal data, and the defects real exports have.

Each :class:`Case` starts from :func:`base_export` (customers, products and order lines as CSV files, with
e-mail addresses and full names declared personal), applies one defect, and states its expected outcome:
the exact lines quarantined with their reasons, or the one-line error naming the file, line, column or
mapping key. ``tests/test_bad_input_corpus.py`` runs every case through ingest and validation (and a
handful through the CLI and the real flow) and checks the outcome, the reconciliation against an
independent count of the input's data lines, and that no planted personal value appears anywhere but raw/.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

AS_OF = date(2025, 12, 31)
CUSTOMERS, PRODUCTS, LINES = 20, 8, 200  # ~12 KB of order lines: a defect can sit past the first 8 KB

CUSTOMER_HEADER = "customer_id,signup_date,country,gender,birth_year,email,full_name,channel"
PRODUCT_HEADER = "product_id,category,name,list_price"
LINE_HEADER = "order_id,customer_id,order_ts,product_id,quantity,unit_price"


def email(i: int) -> str:
    return f"person{i}.secret@corpus.example"


def full_name(i: int) -> str:
    return f"Anneliese Quarantinova{i:03d}"


def planted_personal_values() -> list[str]:
    """Every personal value of the base export; none may appear outside raw/."""
    return [email(i) for i in range(1, CUSTOMERS + 1)] + [full_name(i) for i in range(1, CUSTOMERS + 1)] + [
        "@corpus.example", "Quarantinova"]


def customer_line(i: int) -> str:
    return (f"C{i:03d},2024-{1 + i % 9:02d}-{10 + i % 10:02d},UK,{'FMUX'[i % 4]},{1960 + i},{email(i)},"
            f"{full_name(i)},{'web' if i % 2 else 'store'}")


def product_line(k: int) -> str:
    return f"P{k:02d},{['home', 'garden', 'toys', 'books'][k % 4]},Product {k},{4.5 + k:.2f}"


def line_customer(j: int) -> int:
    return j % CUSTOMERS + 1


def order_line(j: int) -> str:
    """Order line j (1-based): order O{j//2}, customer j % 20 + 1, product j % 8 + 1."""
    return (f"O{(j + 1) // 2:04d},C{line_customer(j):03d},2025-{1 + j % 11:02d}-{1 + j % 27:02d} 10:{j % 60:02d}:00,"
            f"P{j % PRODUCTS + 1:02d},{1 + j % 3},{9.99 + j % 5:.2f}")


@dataclass
class Export:
    """Files of a landing folder (name -> bytes) and the mapping that reads them."""

    files: dict[str, bytes]
    mapping: dict[str, Any]
    symlinks: dict[str, str] = field(default_factory=dict)  # name in landing -> target (absolute, outside)
    as_of: date = AS_OF

    def lines(self, name: str) -> list[str]:
        return self.files[name].decode().split("\n")[:-1]

    def set_lines(self, name: str, lines: list[str], end: str = "\n") -> None:
        self.files[name] = "".join(line + end for line in lines).encode()

    def replace_line(self, name: str, number: int, text: str) -> None:
        """Replace physical line ``number`` (1-based; the header is line 1)."""
        lines = self.lines(name)
        lines[number - 1] = text
        self.set_lines(name, lines)

    def edit_line(self, name: str, number: int, edit: Callable[[list[str]], None]) -> None:
        """Edit the comma-separated fields of line ``number`` in place."""
        fields = self.lines(name)[number - 1].split(",")
        edit(fields)
        self.replace_line(name, number, ",".join(fields))

    def entity(self, name: str) -> dict[str, Any]:
        return self.mapping["entities"][name]


def base_export() -> Export:
    customers = [CUSTOMER_HEADER] + [customer_line(i) for i in range(1, CUSTOMERS + 1)]
    products = [PRODUCT_HEADER] + [product_line(k) for k in range(1, PRODUCTS + 1)]
    lines = [LINE_HEADER] + [order_line(j) for j in range(1, LINES + 1)]
    export = Export(files={}, mapping={
        "name": "corpus",
        "timezone": "UTC",
        "entities": {
            "customers": {"files": "customers.csv", "pii": ["email", "full_name"], "keep": ["full_name"]},
            "products": {"files": "products.csv"},
            "order_lines": {"files": "order_lines.csv"},
        },
    })
    export.set_lines("customers.csv", customers)
    export.set_lines("products.csv", products)
    export.set_lines("order_lines.csv", lines)
    return export


# ---- expected outcomes ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What a case must give.

    ``quarantined``: entity -> {first physical line: regex its reason must match}; exactly these lines of that
    entity are quarantined (entities not named must have none quarantined). ``error``: a regex the one-line
    error must match (then nothing is checked about rows). ``check``: extra assertions on the result.
    """

    quarantined: dict[str, dict[int, str]] = field(default_factory=dict)
    error: str | None = None
    check: Callable[[Any], None] | None = None
    gate_error: str | None = None  # with the default 5 % gate, the run stops with this message


@dataclass
class Case:
    name: str
    defect: Callable[[Export], None]
    outcome: Outcome
    through_flow: bool = False  # also run end to end through the CLI and the real flow


CASES: list[Case] = []


def case(name: str, outcome: Outcome, through_flow: bool = False) -> Callable:
    def register(defect: Callable[[Export], None]) -> Callable[[Export], None]:
        CASES.append(Case(name, defect, outcome, through_flow))
        return defect

    return register


C, P, L = "customers.csv", "products.csv", "order_lines.csv"


def lines_of_customers(customers: set[int], reason: str) -> dict[int, str]:
    """The physical lines of order_lines.csv whose customer is one of ``customers`` (a cascade)."""
    return {j + 1: reason for j in range(1, LINES + 1) if line_customer(j) in customers}


def lines_of_product(product: int, reason: str) -> dict[int, str]:
    """The physical lines of order_lines.csv that sell product ``product`` (a cascade)."""
    return {j + 1: reason for j in range(1, LINES + 1) if j % PRODUCTS + 1 == product}


def encode_lines(lines: list[str], encodings: dict[int, str] | None = None, default: str = "utf-8") -> bytes:
    """Lines joined with LF, each in UTF-8 unless ``encodings`` gives its physical line number another one."""
    encodings = encodings or {}
    return b"".join((line + "\n").encode(encodings.get(n, default)) for n, line in enumerate(lines, start=1))


# ---- silent loss or merged rows ------------------------------------------------------------------------------
@case("stray quote merges three lines", Outcome(quarantined={"order_lines": {11: r"spans lines 11.13"}}),
      through_flow=True)
def _stray_quote(x: Export) -> None:
    x.edit_line(L, 11, lambda f: f.__setitem__(3, '"' + f[3]))
    x.edit_line(L, 13, lambda f: f.__setitem__(3, f[3] + '"'))


@case("unterminated quote runs to the end of the file",
      Outcome(quarantined={"order_lines": {40: r"spans lines 40-201.*unbalanced quote"}},
              gate_error=r"order_lines quarantined 162 of 200 lines"))
def _unterminated_quote(x: Export) -> None:
    x.edit_line(L, 40, lambda f: f.__setitem__(3, '"' + f[3]))


@case("truncated row has too few fields", Outcome(quarantined={"order_lines": {30: r"4 fields, expected 6"}}))
def _truncated_row(x: Export) -> None:
    x.replace_line(L, 30, ",".join(x.lines(L)[29].split(",")[:4]))


@case("row with an extra field", Outcome(quarantined={"order_lines": {31: r"7 fields, expected 6"}}))
def _extra_field(x: Export) -> None:
    x.replace_line(L, 31, x.lines(L)[30] + ",surplus")


@case("file cut inside the last number", Outcome(quarantined={"order_lines": {LINES + 1: r"line break"}}))
def _cut_last_number(x: Export) -> None:
    x.files[L] = x.files[L].rstrip(b"\n")[:-1]  # 12.99 -> 12.9 and no line end


@case("a very wide row", Outcome(quarantined={"order_lines": {50: r"5000 fields, expected 6"}}))
def _wide_row(x: Export) -> None:
    x.replace_line(L, 50, ",".join(["9"] * 5000))


@case("blank lines between rows are not data", Outcome())
def _blank_lines(x: Export) -> None:
    lines = x.lines(L)
    x.set_lines(L, lines[:20] + ["", ""] + lines[20:60] + [""] + lines[60:])


@case("CRLF line ends", Outcome())
def _crlf(x: Export) -> None:
    x.set_lines(L, x.lines(L), end="\r\n")


@case("CR-only line ends (classic Mac)", Outcome(quarantined={"order_lines": {7: r"fields, expected 6"}}))
def _cr_only(x: Export) -> None:
    lines = x.lines(L)
    lines[6] = ",".join(lines[6].split(",")[:3])  # a short line on line 7 proves the numbering holds
    x.set_lines(L, lines, end="\r")


@case("CRLF and LF mixed in one file", Outcome(quarantined={"order_lines": {90: r"fields, expected 6"}}))
def _mixed_line_ends(x: Export) -> None:
    lines = x.lines(L)
    lines[89] = ",".join(lines[89].split(",")[:2])
    x.files[L] = b"".join((line + ("\r\n" if n % 3 else "\n")).encode() for n, line in enumerate(lines))


@case("a quoted line break in a text field, allowed by the mapping", Outcome())
def _multiline_allowed(x: Export) -> None:
    x.replace_line(P, 3, 'P02,garden,"Product 2\nsecond line of the name",6.50')
    x.entity("products")["csv"] = {"multiline_values": True}


@case("a quoted line break where the mapping does not allow one",
      Outcome(quarantined={"products": {3: r"spans lines 3.4"},
                           "order_lines": lines_of_product(2, r"product")},
              gate_error=r"order_lines.*25 .*product"))
def _multiline_refused(x: Export) -> None:
    x.replace_line(P, 3, 'P02,garden,"Product 2\nsecond line of the name",6.50')


# ---- encodings and file kinds ---------------------------------------------------------------------------------
@case("Latin-1 byte in the first lines of a UTF-8 file", Outcome(error=r"customers\.csv.*line 3.*utf-8"),
      through_flow=True)
def _latin1_header_region(x: Export) -> None:
    lines = x.lines(C)
    lines[2] = lines[2].replace(",UK,", ",Zo\u00eb,")
    x.files[C] = encode_lines(lines, {3: "latin-1"})


@case("Latin-1 byte far into a UTF-8 file", Outcome(error=r"order_lines\.csv.*line 180.*utf-8"))
def _latin1_late(x: Export) -> None:
    lines = x.lines(L)
    lines[179] = lines[179].replace("O", "\u00d8", 1)
    x.files[L] = encode_lines(lines, {180: "latin-1"})


@case("Latin-1 file declared as latin-1", Outcome(check=lambda r: r.assert_value("customers", 2, "country",
                                                                                    "Zo\u00eb")))
def _latin1_declared(x: Export) -> None:
    lines = x.lines(C)
    lines[1] = lines[1].replace(",UK,", ",Zo\u00eb,")
    x.files[C] = encode_lines(lines, default="latin-1")
    x.entity("customers")["csv"] = {"encoding": "latin-1"}


@case("cp1252 curly quotes declared as cp1252", Outcome(check=lambda r: r.assert_value(
    "products", 2, "name", "\u201cBest\u201d mug")))
def _cp1252(x: Export) -> None:
    lines = x.lines(P)
    lines[1] = "P01,home,\u201cBest\u201d mug,5.50"
    x.files[P] = encode_lines(lines, default="cp1252")
    x.entity("products")["csv"] = {"encoding": "cp1252"}


@case("UTF-8 byte-order mark", Outcome(check=lambda r: r.assert_value("customers", 2, "customer_id", "C001")))
def _utf8_bom(x: Export) -> None:
    x.files[C] = b"\xef\xbb\xbf" + x.files[C]


@case("UTF-16 file with a byte-order mark", Outcome(error=r"customers\.csv.*(UTF-16|utf-16)"))
def _utf16(x: Export) -> None:
    x.files[C] = x.files[C].decode().encode("utf-16")


@case("gzip file named .csv", Outcome(error=r"order_lines\.csv.*gzip"))
def _gzip_named_csv(x: Export) -> None:
    x.files[L] = gzip.compress(x.files[L], mtime=0)


@case("NUL byte inside a row", Outcome(quarantined={"order_lines": {60: r"NUL"}}))
def _nul_byte(x: Export) -> None:
    lines = x.lines(L)
    lines[59] = lines[59].replace("P", "P\x00", 1)
    x.set_lines(L, lines)


# ---- headers and columns ----------------------------------------------------------------------------------------
@case("duplicate header names", Outcome(error=r"customers\.csv.*duplicate.*country"))
def _duplicate_header(x: Export) -> None:
    x.replace_line(C, 1, CUSTOMER_HEADER.replace("gender", "country"))


@case("optional column whose header changed case", Outcome(check=lambda r: r.assert_column_filled(
    "customers", "country")))
def _header_case(x: Export) -> None:
    x.replace_line(C, 1, CUSTOMER_HEADER.replace("country", "Country"))


@case("header names with surrounding blanks", Outcome(check=lambda r: r.assert_column_filled(
    "order_lines", "unit_price")))
def _header_blanks(x: Export) -> None:
    x.replace_line(L, 1, LINE_HEADER.replace("unit_price", " unit_price "))


@case("required column missing", Outcome(error=r"order_lines.*order_lines\.csv.*order_ts"))
def _missing_required(x: Export) -> None:
    x.set_lines(L, [",".join(f for n, f in enumerate(line.split(",")) if n != 2) for line in x.lines(L)])


# ---- numbers ------------------------------------------------------------------------------------------------------
@case("thousands separator in a price", Outcome(quarantined={"order_lines": {20: r"unit_price"}}))
def _thousands(x: Export) -> None:
    x.edit_line(L, 20, lambda f: f.__setitem__(5, '"1,234.50"'))


@case("decimal commas declared by the mapping", Outcome(check=lambda r: r.assert_value(
    "order_lines", 2, "unit_price", 10.99)))
def _decimal_comma(x: Export) -> None:
    x.set_lines(L, [line.replace(",", ";").replace(".", ",") for line in x.lines(L)])
    x.entity("order_lines")["csv"] = {"delimiter": ";", "decimal": ","}


@case("scientific notation", Outcome(quarantined={"order_lines": {22: r"quantity"}},
                                     check=lambda r: r.assert_value("order_lines", 21, "quantity", 10)))
def _scientific(x: Export) -> None:
    x.edit_line(L, 21, lambda f: f.__setitem__(4, "1e1"))
    x.edit_line(L, 22, lambda f: f.__setitem__(4, "1.5e0"))


@case("infinite and NaN numbers", Outcome(quarantined={"products": {4: r"list_price"},
                                                       "order_lines": {23: r"unit_price", 24: r"unit_price",
                                                                       **lines_of_product(3, r"product")}},
                                      gate_error=r"order_lines.*product"))
def _non_finite(x: Export) -> None:
    x.edit_line(P, 4, lambda f: f.__setitem__(3, "inf"))
    x.edit_line(L, 23, lambda f: f.__setitem__(5, "NaN"))
    x.edit_line(L, 24, lambda f: f.__setitem__(5, "-Infinity"))


# ---- dates and ranges ------------------------------------------------------------------------------------------
def _set_field(name: str, line: int, column: int, value: str) -> Callable[[Export], None]:
    return lambda x: x.edit_line(name, line, lambda f: f.__setitem__(column, value))


def _both(*defects: Callable[[Export], None]) -> Callable[[Export], None]:
    def apply(x: Export) -> None:
        for defect in defects:
            defect(x)

    return apply


case("order timestamp in 1850", Outcome(quarantined={"order_lines": {25: r"order_ts.*1850"}}), through_flow=True)(
    _set_field(L, 25, 2, "1850-03-01 10:00:00"))
case("order timestamp 0001-01-01", Outcome(quarantined={"order_lines": {26: r"order_ts.*0001"}}))(
    _set_field(L, 26, 2, "0001-01-01"))
case("order timestamp after the as-of date", Outcome(quarantined={"order_lines": {27: r"order_ts.*after"}}))(
    _set_field(L, 27, 2, "2026-03-01 09:00:00"))
case("impossible calendar date", Outcome(quarantined={"order_lines": {28: r"order_ts"}}))(
    _set_field(L, 28, 2, "2025-02-30 10:00:00"))
case("timestamp with a UTC offset", Outcome(check=lambda r: r.assert_value(
    "order_lines", 29, "order_ts", "2025-03-01T09:00:00+00:00")))(_set_field(L, 29, 2, "2025-03-01T10:00:00+01:00"))
case("signup date in 1850 (its lines follow the customer)",
     Outcome(quarantined={"customers": {6: r"signup_date.*1850"},
                          "order_lines": lines_of_customers({5}, r"customer")}))(
    _set_field(C, 6, 1, "1850-01-01"))
case("signup date after the as-of date", Outcome(quarantined={"customers": {7: r"signup_date.*after"},
                                                              "order_lines": lines_of_customers({6}, r"customer")}))(
    _set_field(C, 7, 1, "2030-01-01"))
case("birth year 2099 on four customers: the cascade is explained",
     Outcome(quarantined={"customers": {n + 1: r"birth_year.*2099" for n in (1, 2, 3, 4)},
                          "order_lines": lines_of_customers({1, 2, 3, 4}, r"customer")},
             gate_error=r"order_lines.*40 .*4 customers.*birth_year"), through_flow=True)(
    _both(*(_set_field(C, n + 1, 4, "2099") for n in (1, 2, 3, 4))))
case("birth year 1800", Outcome(quarantined={"customers": {9: r"birth_year.*1800"},
                                             "order_lines": lines_of_customers({8}, r"customer")}))(
    _set_field(C, 9, 4, "1800"))
case("negative price", Outcome(quarantined={"order_lines": {32: r"unit_price.*-5"}}))(
    _set_field(L, 32, 5, "-5.00"))
case("absurd quantity", Outcome(quarantined={"order_lines": {33: r"quantity.*1000000000"}}))(
    _set_field(L, 33, 4, "1000000000"))

# ---- keys and references ---------------------------------------------------------------------------------------
case("order line of an unknown customer", Outcome(quarantined={"order_lines": {34: r"customer_id.*not.*customers"}}))(
    _set_field(L, 34, 1, "C999"))
case("order line of an unknown product", Outcome(quarantined={"order_lines": {35: r"product_id.*not.*products"}}))(
    _set_field(L, 35, 3, "P99"))
case("order line without a customer id", Outcome(quarantined={"order_lines": {36: r"customer_id"}}))(
    _set_field(L, 36, 1, ""))
case("ids with surrounding blanks and tabs", Outcome(check=lambda r: r.assert_value(
    "order_lines", 37, "customer_id", f"C{line_customer(36):03d}")))(
    _set_field(L, 37, 1, f" \tC{line_customer(36):03d} "))


@case("one customer id on two rows that disagree",
      Outcome(quarantined={"customers": {4: r"disagree", CUSTOMERS + 2: r"disagree"},
                           "order_lines": lines_of_customers({3}, r"customer")},
              gate_error=r"customers quarantined 2 of 21.*disagree"))
def _conflicting_duplicate(x: Export) -> None:
    x.set_lines(C, [*x.lines(C), customer_line(3).replace(",UK,", ",FR,")])


@case("an exactly repeated order line is kept (clean counts and drops it)", Outcome())
def _exact_duplicate(x: Export) -> None:
    x.set_lines(L, [*x.lines(L), x.lines(L)[40]])


@case("the header repeated inside the file (two exports concatenated)",
      Outcome(quarantined={"order_lines": {61: r"order_ts|quantity"}}))
def _header_as_data(x: Export) -> None:
    x.replace_line(L, 61, LINE_HEADER)


@case("purchase log: no customer is derived from a quarantined line",
      Outcome(quarantined={"order_lines": {61: r"order_ts|quantity", 62: r"order_ts.*1850"}},
              check=lambda r: r.assert_no_key("customers", "customer_id", "customer_id")))
def _derived_from_quarantined(x: Export) -> None:
    del x.mapping["entities"]["customers"]
    x.replace_line(L, 61, LINE_HEADER)
    x.edit_line(L, 62, lambda f: f.__setitem__(2, "1850-01-01 10:00:00"))


# ---- the mapping, paths and personal data ------------------------------------------------------------------------
def _entity_option(entity: str, key: str, value: Any) -> Callable[[Export], None]:
    return lambda x: x.entity(entity).__setitem__(key, value)


case("invalid regular expression", Outcome(error=r"regex_replace.*customer_id.*regex"))(
    _entity_option("order_lines", "regex_replace", {"customer_id": {"pattern": "(C", "repl": ""}}))
case("unknown time zone", Outcome(error=r"timezone.*Europe/Berlni"), through_flow=True)(
    lambda x: x.mapping.__setitem__("timezone", "Europe/Berlni"))
case("a personal column misspelt in pii", Outcome(error=r"pii.*emial"))(
    _entity_option("customers", "pii", ["emial", "full_name"]))
case("files escaping the landing folder with ..", Outcome(error=r"order_lines.*\.\./"))(
    _entity_option("order_lines", "files", "../../../../etc/passwd"))
case("files given as an absolute path", Outcome(error=r"order_lines.*/etc/passwd"))(
    _entity_option("order_lines", "files", "/etc/passwd"))


@case("a symlink in the landing folder pointing outside it", Outcome(error=r"order_lines.*outside"))
def _symlink_out(x: Export) -> None:
    x.symlinks["linked.csv"] = "/etc/passwd"
    x.entity("order_lines")["files"] = "linked.csv"


case("a glob that matches nothing", Outcome(error=r"order_lines.*no file matches.*orders_\*\.csv"))(
    _entity_option("order_lines", "files", "orders_*.csv"))
case("a misspelt option", Outcome(error=r"delimeter"))(_entity_option("order_lines", "csv", {"delimeter": ";"}))
case("an unknown entity", Outcome(error=r"unknown entities.*invoices"))(
    lambda x: x.mapping["entities"].__setitem__("invoices", {"files": "order_lines.csv"}))


@case("e-mail addresses in a column not declared personal", Outcome(error=r"customers\.contact.*e-mail"))
def _undeclared_email(x: Export) -> None:
    x.replace_line(C, 1, CUSTOMER_HEADER.replace(",email,", ",contact,"))
    x.entity("customers").update(keep=["full_name", "contact"], pii=["full_name"])


@case("phone numbers in a column not declared personal", Outcome(error=r"customers\.phone.*phone"))
def _undeclared_phone(x: Export) -> None:
    lines = x.lines(C)
    x.set_lines(C, [lines[0] + ",phone"] + [f"{line},+44 7700 900{n:03d}" for n, line in enumerate(lines[1:])])
    x.entity("customers")["keep"] = ["full_name", "phone"]


case("a timestamp format that does not fit the file",
     Outcome(quarantined={"order_lines": {n: r"order_ts" for n in range(2, LINES + 2)}},
             gate_error=r"order_lines.*order_ts"))(_entity_option("order_lines", "formats", {"order_ts": "%d.%m.%Y"}))


@case("an as-of date before all daily files", Outcome(error=r"order_lines.*no file.*on or before 2024-06-30"))
def _as_of_before_data(x: Export) -> None:
    x.files["orders/2025-01-01.csv"] = x.files.pop(L)
    x.entity("order_lines").update(files="orders/*.csv", daily=True)
    x.as_of = date(2024, 6, 30)


case("an as-of date before all the data of one file",
     Outcome(quarantined={"customers": {n + 1: r"signup_date.*after" for n in range(1, CUSTOMERS + 1)
                                        if customer_line(n).split(",")[1] > "2024-03-31"},
                          "order_lines": {n: r"order_ts.*after" for n in range(2, LINES + 2)}},
             gate_error=r"as-of date 2024-03-31 is before all the data: every one of the 200 order_lines rows has "
                        r"order_ts after it \(the earliest is 2025-01-0\d\)"))(
    lambda x: setattr(x, "as_of", date(2024, 3, 31)))
