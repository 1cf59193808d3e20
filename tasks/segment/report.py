"""What a person reads about the segments: the report section, the migration table and the figures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from crm_analytics.parameters import SegmentOptions
from crm_analytics.reporting import markdown_table
from tasks.segment.core import SegmentOutput
from tasks.segment.identity import NOT_IN_RUN


def segment_section(out: SegmentOutput, options: SegmentOptions) -> str:
    identity = out.identity
    if out.assignments.empty:
        return "## Segments\n\nNo customer with a purchase: nothing to segment."
    view = out.profiles[["segment_id", "segment_name", "customers", "share", "frequency_orders",
                         "mean_interpurchase_days", "avg_basket_size", "typical_unit_price", "return_rate",
                         "avg_order_value", "rfm_score", "share_at_risk", "share_hibernating"]].copy()
    for column in ("share", "return_rate", "share_at_risk", "share_hibernating"):
        view[column] = view[column].map("{:.1%}".format)
    view["mean_interpurchase_days"] = view["mean_interpurchase_days"].map(lambda v: "-" if pd.isna(v) else f"{v:.1f}")
    view.columns = ["id", "segment", "customers", "share", "orders", "gap (days)", "lines/order", "unit price",
                    "returns", "order value", "RFM", "at risk", "hibernating"]
    clustered = identity["clustered_customers"]
    if identity["k"]:
        chosen = out.silhouette.loc[out.silhouette["chosen"]].iloc[0]
        how = (f"{options.method} on {', '.join(options.features)}: {identity['k']} segments "
               f"(silhouette {chosen['silhouette']:.3f})")
    else:
        how = "no clustering (too few customers with enough orders)"
    text = [f"## Segments\n\n{clustered:,} of {len(out.assignments):,} customers have at least {options.min_orders} "
            f"orders and are clustered by {how}; the others are grouped by rule as one-time or light buyers."]
    if identity["previous_as_of"] is None:
        text.append("First run: no previous segments to keep identities from.")
    else:
        stability = identity["stability"]
        warn = " **Below the warning level.**" if stability is not None and stability < options.min_stability else ""
        text.append(
            f"Identities follow the run of {identity['previous_as_of']}: {len(identity['matched'])} segments kept "
            f"their id and name, {len(identity['new_segments'])} are new, {len(identity['retired_segments'])} "
            f"retired. Stability (customers in both runs who kept their segment): "
            f"**{stability:.2%}**.{warn}" if stability is not None else "No customer was in both runs.")
    text.append(markdown_table(view, "{:.1f}"))
    if len(out.migration):
        text.append("Migration since the previous run (rows: previous segment, columns: tonight's):\n\n"
                    + markdown_table(migration_table(out.migration), "{:.0f}"))
    return "\n\n".join(text)


def migration_table(migration: pd.DataFrame) -> pd.DataFrame:
    """The migration counts as a wide table, rows and columns in segment-id order ("not in run" last)."""
    names = dict(zip(migration["from_segment_id"], migration["from_segment"], strict=True))
    names.update(zip(migration["to_segment_id"], migration["to_segment"], strict=True))
    wide = migration.pivot_table(index="from_segment_id", columns="to_segment_id", values="customers",
                                 aggfunc="sum", fill_value=0)

    def order(ids: pd.Index) -> list[int]:
        return sorted(ids, key=lambda i: (i == NOT_IN_RUN, i))

    wide = wide.loc[order(wide.index), order(wide.columns)]
    wide.columns = [names[i] for i in wide.columns]
    wide.insert(0, "from \\ to", [names[i] for i in wide.index])
    return wide.reset_index(drop=True)


def segment_figures(out: SegmentOutput) -> dict[str, plt.Figure]:
    sizes, ax = plt.subplots(figsize=(6.5, 3.8))
    colours = ["#4C72B0" if kind == "cluster" else "#A0A0A0" for kind in out.profiles["segment_kind"]]
    ax.barh(out.profiles["segment_name"], out.profiles["customers"], color=colours)
    ax.invert_yaxis()
    ax.set(xlabel="customers", title="Segment sizes (grey: grouped by rule)")
    sizes.tight_layout()
    figures = {"sizes": sizes}

    projection, ax = plt.subplots(figsize=(6.5, 5))
    points = out.projection[~out.projection["is_centre"].astype(bool)]
    for name, group in points.groupby("segment", sort=True):
        ax.scatter(group["pc1"], group["pc2"], s=6, alpha=0.5, label=name)
    centres = out.projection[out.projection["is_centre"].astype(bool)]
    ax.scatter(centres["pc1"], centres["pc2"], marker="X", s=120, color="black", label="segment centre")
    ax.set(xlabel="first principal component", ylabel="second principal component",
           title="Clustered customers in two dimensions (PCA)")
    if len(points):
        ax.legend(fontsize=8)
    projection.tight_layout()
    figures["projection"] = projection

    curve, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(out.silhouette["k"], out.silhouette["silhouette"], marker="o")
    chosen = out.silhouette[out.silhouette["chosen"].astype(bool)]
    ax.scatter(chosen["k"], chosen["silhouette"], s=120, facecolors="none", edgecolors="red", label="chosen")
    ax.set(xlabel="k", ylabel="silhouette", title="Silhouette by number of segments")
    curve.tight_layout()
    figures["silhouette"] = curve
    return figures
