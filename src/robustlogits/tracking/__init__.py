"""The one door to MLflow: the only package that imports it.

It offers the product's verbs rather than MLflow's API: open the right kind of run (`runs`), keep
what a run produced (`artifacts`), find finished work by its key (`keyed`), log and load models
(`models`), and register, promote and relate versions (`registry`). Guarantees the rest of the
code relies on:
- a run opened here ends FINISHED or FAILED whatever happens (exceptions, Ctrl-C, SIGTERM);
- artifacts are written to a temporary file first and uploaded whole, never truncated;
- a registry version is created only after its model is logged.
"""

from robustlogits.tracking.artifacts import (
    download_artifact,
    list_artifacts,
    log_arrays,
    log_bytes,
    log_dataset_input,
    log_epoch_image,
    log_figure,
    log_file,
    log_folder,
    log_json,
    log_model_inputs,
    log_results,
    log_text,
    metric_name,
)
from robustlogits.tracking.attack_records import load_attack_result, log_attack_result
from robustlogits.tracking.keyed import (
    KEY_TAG,
    Keyed,
    find_finished_run,
    find_or_run,
    find_runs_with_key,
    finished_runs_by_key,
    job_key,
)
from robustlogits.tracking.models import (
    ResolvedModel,
    load_model,
    log_torch_model,
    resolve_and_load,
    synthetic_params_from_run,
)
from robustlogits.tracking.registry import (
    checkpoint_uri,
    logged_model_id,
    model_versions,
    promote,
    register_version,
    resolve_model,
    run_versions,
    set_alias,
    set_version_tags,
    students_of,
    update_students_tag,
)
from robustlogits.tracking.runs import (
    RunRecord,
    active_run_id,
    artifact_run,
    child_runs,
    end_run_if_running,
    finished_runs,
    holding,
    job_run,
    log_params,
    log_params_to,
    metric_history,
    nested_run,
    resume_run,
    run_record,
    set_tags,
    study_run,
)
from robustlogits.tracking.store import (
    DEFAULT_TRACKING_URI,
    check_store,
    configure_store,
    experiment_name_of,
    launched_run_id,
)

__all__ = [
    "active_run_id", "artifact_run", "check_store", "checkpoint_uri", "child_runs", "configure_store",
    "DEFAULT_TRACKING_URI", "download_artifact", "end_run_if_running", "experiment_name_of",
    "find_finished_run", "find_or_run", "find_runs_with_key", "finished_runs", "finished_runs_by_key",
    "holding", "job_key", "job_run", "KEY_TAG", "Keyed", "launched_run_id", "list_artifacts",
    "load_attack_result", "load_model", "log_arrays", "log_attack_result", "log_bytes", "log_dataset_input",
    "log_epoch_image", "log_figure", "log_file", "log_folder", "log_json", "log_model_inputs", "log_params",
    "log_params_to", "log_results", "log_text", "log_torch_model", "logged_model_id", "metric_history",
    "metric_name", "model_versions", "nested_run", "promote", "register_version", "resolve_and_load",
    "resolve_model", "ResolvedModel", "resume_run", "run_record", "run_versions", "RunRecord", "set_alias",
    "set_tags", "set_version_tags", "students_of", "study_run", "synthetic_params_from_run",
    "update_students_tag",
]
