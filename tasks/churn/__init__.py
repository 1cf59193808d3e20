"""Churn: leakage-safe labels, an honest model comparison, champion/challenger, and scored customers.

Labels come from transactions (``transactional``: labelled cutoffs, judged forward in time) or from an
explicit ``churned`` column (``explicit``: the table's own columns, stratified CV); both hand their comparison
to one champion/challenger core (``champion``). The modules, bottom up:

- ``examples``: labels, features (with the BG/NBD probabilities of ``tasks.btyd``), cutoffs;
  ``horizon``: inter-purchase gaps and the suggested horizon;
- ``metrics``: validation metrics; ``models``: the model zoo; ``explanations``: top factors, importances, scores;
  ``model_files``: skops files against trusted types;
- ``champion``: the contest, its ``Decision``, the sidecar and the metrics; ``transactional`` and ``explicit``:
  the two trainers; ``report``: the report text and figures; ``stage``: the Prefect task edge.

Every public name of the former single module is re-exported here, and saved models keep naming the stage's
own types ``tasks.churn.<name>`` (see ``models``), so files written before the split still load: keep
``BalancedClassifier``, ``MeanEnsemble`` and ``signed_log1p`` importable from here.
"""

from tasks.btyd import BGNBD_FIT_ROWS, bgnbd_features, fit_bgnbd, repeat_purchase_summary
from tasks.churn.champion import (
    Champion,
    ChurnOutput,
    Contest,
    Decision,
    Rescored,
    Scorer,
    challenger_scorer,
    champion_problem,
    champion_scorer,
    churn_output,
    decide,
    hold_contest,
    load_champion,
    with_champion_row,
)
from tasks.churn.examples import (
    ID,
    LABEL,
    NON_FEATURES,
    ChurnNotPossible,
    LineParts,
    active_customers,
    churn_features,
    churn_features_by_part,
    churn_labels,
    cutoffs_after,
    labelled_examples,
    learner_lines_by_part,
    numeric_feature_columns,
    plan_cutoffs,
    top_categories_at,
    training_population,
    training_sample,
    with_churn_views,
)
from tasks.churn.explanations import (
    ABLATION_BATCH_ROWS,
    FACTOR_CANDIDATES_AT_SCALE,
    MAX_FACTOR_CANDIDATES,
    PERMUTATION_MAX_ROWS,
    PERMUTATION_REPEATS,
    PREDICT_BATCH_ROWS,
    PREDICT_THREADS,
    FactorRecipe,
    ablation_contributions,
    empty_factors,
    explain,
    explain_customers,
    explain_method,
    factor_candidates,
    global_importances,
    in_parallel_batches,
    linear_contributions,
    predict_in_batches,
    score_customers,
    source_column,
    stacked_copies,
    top_factors,
    typical_values,
)
from tasks.churn.explicit import coerce_labels, infer_columns, train_explicit
from tasks.churn.horizon import GAP_QUANTILES, horizon_advice, interpurchase_gaps
from tasks.churn.metrics import (
    CALIBRATION_BINS,
    RISK_BAND_NAMES,
    best_f1_threshold,
    calibration_table,
    choose_threshold,
    crossfit_operating_point,
    evaluate,
    honest_metrics,
    recall_threshold,
    risk_band,
    threshold_rule_text,
    top_decile_lift,
)
from tasks.churn.model_files import (
    TRUSTED_TYPES,
    UntrustedModelError,
    dump_model,
    estimator_parameters,
    factors_on_demand,
    load_model,
    run_factors,
)
from tasks.churn.models import (
    ENSEMBLE,
    ENSEMBLE_MEMBERS,
    FOREST_MAX_SAMPLES,
    MAX_CATEGORY_LEVELS,
    BalancedClassifier,
    MeanEnsemble,
    candidate_models,
    compare_models,
    comparison_table,
    model_frame,
    predict,
    preprocessor,
    signed_log1p,
    single_openmp_thread,
)
from tasks.churn.report import churn_figures, churn_section, horizon_text
from tasks.churn.stage import churn, explicit_stage, publish
from tasks.churn.transactional import train_and_score

__all__ = [
    "ABLATION_BATCH_ROWS", "BGNBD_FIT_ROWS", "CALIBRATION_BINS", "ENSEMBLE", "ENSEMBLE_MEMBERS",
    "FACTOR_CANDIDATES_AT_SCALE", "FOREST_MAX_SAMPLES", "GAP_QUANTILES", "ID", "LABEL", "MAX_CATEGORY_LEVELS",
    "MAX_FACTOR_CANDIDATES", "NON_FEATURES", "PERMUTATION_MAX_ROWS", "PERMUTATION_REPEATS", "PREDICT_BATCH_ROWS",
    "PREDICT_THREADS", "RISK_BAND_NAMES", "TRUSTED_TYPES", "BalancedClassifier", "Champion", "ChurnNotPossible",
    "ChurnOutput", "Contest", "Decision", "FactorRecipe", "LineParts", "MeanEnsemble", "Rescored", "Scorer",
    "UntrustedModelError", "ablation_contributions", "active_customers", "best_f1_threshold", "bgnbd_features",
    "calibration_table", "candidate_models", "challenger_scorer", "champion_problem", "champion_scorer",
    "choose_threshold", "churn", "churn_features", "churn_features_by_part", "churn_figures", "churn_labels",
    "churn_output", "churn_section", "coerce_labels", "compare_models", "comparison_table",
    "crossfit_operating_point", "cutoffs_after", "decide", "dump_model", "empty_factors", "estimator_parameters",
    "evaluate", "explain", "explain_customers", "explain_method", "explicit_stage", "factor_candidates",
    "factors_on_demand", "fit_bgnbd", "global_importances", "hold_contest", "honest_metrics", "horizon_advice",
    "horizon_text", "in_parallel_batches", "infer_columns", "interpurchase_gaps", "labelled_examples",
    "learner_lines_by_part", "linear_contributions", "load_champion", "load_model", "model_frame",
    "numeric_feature_columns", "plan_cutoffs", "predict", "predict_in_batches", "preprocessor", "publish",
    "recall_threshold", "repeat_purchase_summary", "risk_band", "run_factors", "score_customers", "signed_log1p",
    "single_openmp_thread", "source_column", "stacked_copies", "threshold_rule_text", "top_categories_at",
    "top_decile_lift", "top_factors", "train_and_score", "train_explicit", "training_population", "training_sample",
    "typical_values", "with_champion_row", "with_churn_views",
]
