"""Reports of a sparse model: the sparsity tables (`tables`), the reallocation history and its plots (`history`)."""

from .history import history_rows, plot_history, save_history_csv
from .tables import STATS_COLUMNS, SUM_COLUMNS, count_parameters, stats_table, sum_table

__all__ = ["STATS_COLUMNS", "SUM_COLUMNS", "count_parameters", "history_rows", "plot_history", "save_history_csv",
           "stats_table", "sum_table"]
