"""The CLI's summary: the table fits an 80-column terminal and the cost line states the gap."""

from __future__ import annotations

from rich.console import Console

from shoal.cli.display import cost_line, summary_table
from shoal.experiment import ParadigmResult


def _results(auc: bool) -> list[ParadigmResult]:
    fed = {"accuracy": 0.9708, "fed_eval/accuracy_worst": 0.954, "fed_eval/accuracy_p10": 0.958}
    cen = {"accuracy": 0.9776}
    if auc:
        fed["auc"], cen["auc"] = 0.9623, 0.9415
    return [ParadigmResult("federated", 20, fed, 120_000, 2_282_502, 26.0),
            ParadigmResult("centralized", 20, cen, 120_000, 0, 14.5)]


def test_summary_table_fits_80_columns_without_truncating() -> None:
    console = Console(width=80, record=True)
    console.print(summary_table(_results(auc=True)))
    text = console.export_text()
    assert "…" not in text
    row = next(line for line in text.splitlines() if line.strip().startswith("federated"))
    assert row.split() == ["federated", "0.9708", "0.9623", "0.954", "0.958", "20", "120,000",
                           "2.3", "MB", "26.0", "s"]


def test_cost_line_states_accuracy_points_and_auc() -> None:
    assert cost_line(_results(auc=False)) == "federated vs centralized: -0.68 accuracy points"
    assert cost_line(_results(auc=True)) == ("federated vs centralized: -0.68 accuracy points, "
                                            "+0.021 AUC")
    assert cost_line(_results(auc=False)[:1]) is None


def test_regression_summary_shows_rmse_mae_and_the_highest_error_as_worst() -> None:
    fed = {"rmse": 17.31, "mae": 12.5, "mse": 299.6, "fed_eval/rmse_worst": 41.2,
           "fed_eval/rmse_p90": 30.05}
    cen = {"rmse": 15.02, "mae": 11.0, "mse": 225.6}
    results = [ParadigmResult("federated", 30, fed, 200_000, 2_282_502, 26.0),
               ParadigmResult("centralized", 30, cen, 200_000, 0, 14.5)]
    console = Console(width=80, record=True)
    console.print(summary_table(results))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "paradigm" in line)
    assert header.split() == ["paradigm", "RMSE", "MAE", "worst", "p90", "rounds", "examples",
                              "bytes", "time"]
    row = next(line for line in text.splitlines() if line.strip().startswith("federated"))
    assert row.split()[:5] == ["federated", "17.31", "12.5", "41.2", "30.1"]
    assert "RMSE of the worst client (the highest) and the 90th percentile" in " ".join(
        text.split())
    assert cost_line(results) == "federated vs centralized: RMSE +2.29 (17.31 vs 15.02)"
