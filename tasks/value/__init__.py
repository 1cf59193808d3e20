"""Customer value: lifetime value (BG/NBD + Gamma-Gamma from ``tasks.btyd``), value at risk and the ranked
action list. ``clv``: the summary, fits and CLV; ``actions``: value at risk, the list and its rules; ``core``:
the pure stage function; ``report``: section and figure; ``stage``: the Prefect task edge."""

from tasks.value.actions import ACTION_RULES, action_list, value_at_risk, value_by_segment
from tasks.value.clv import ValueNotPossible, customer_lifetime_values, value_summary
from tasks.value.core import ValueOutput, customer_value
from tasks.value.stage import value

__all__ = ["ACTION_RULES", "ValueNotPossible", "ValueOutput", "action_list", "customer_lifetime_values",
           "customer_value", "value", "value_at_risk", "value_by_segment", "value_summary"]
