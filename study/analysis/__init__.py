"""Analysis of run directories: the paper's figures and tables, layer probes' results, the claims report.

`load_runs(runs_dir)` is the entry point for notebooks: every run's metrics as one long-form DataFrame.
"""

from .load import RunData, load_gradients, load_responses, load_run_table, load_runs

__all__ = ["RunData", "load_gradients", "load_responses", "load_run_table", "load_runs"]
