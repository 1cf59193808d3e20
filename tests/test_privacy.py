import pandas as pd

from crm_analytics.mapping import load_mapping
from crm_analytics.privacy import pseudonym_key, pseudonymise
from tasks.ingest import parse_entity


def test_pseudonyms_are_keyed_stable_and_replace_the_column():
    frame = pd.DataFrame({"customer_id": ["c1", "c2", "c3"], "email": ["a@x.org", None, "a@x.org"]})
    out = pseudonymise(frame, ["email", "phone"], b"k1")
    assert "email" not in out.columns and "email_pseudonym" in out.columns
    assert out["email_pseudonym"].iloc[0] == out["email_pseudonym"].iloc[2]
    assert pd.isna(out["email_pseudonym"].iloc[1])
    assert out["email_pseudonym"].iloc[0] != pseudonymise(frame, ["email"], b"k2")["email_pseudonym"].iloc[0]
    assert "a@x.org" not in out.to_string()
    assert frame.columns.tolist() == ["customer_id", "email"]  # input untouched


def test_local_key_is_created_once_with_private_permissions(tmp_path, monkeypatch):
    monkeypatch.delenv("CRM_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("CRM_PSEUDONYM_SECRET_BLOCK", raising=False)
    first = pseudonym_key(tmp_path)
    assert first == pseudonym_key(tmp_path) and len(first) == 64
    assert (tmp_path / ".secrets" / "pseudonym.key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("CRM_PSEUDONYM_KEY", "from-env")
    assert pseudonym_key(tmp_path) == b"from-env"


def test_parse_errors_name_a_personal_column_without_quoting_it():
    mapping = load_mapping("sample")
    mapping.entities["customers"].types["email"] = "int"  # force a parse failure on the personal column
    text = pd.DataFrame({"customer_id": ["c1"], "signup_date": ["2024-01-01"], "email": ["ann@example.org"],
                         "_source_file": ["c.csv"], "_source_line": [2]})
    out = parse_entity(text, "customers", mapping.model_copy(update={"entities": {
        **mapping.entities, "customers": mapping.entities["customers"].model_copy(update={"keep": ["email"]})}}))
    assert out.loc[0, "_parse_errors"] == "email=<redacted>"
