"""The summary table says what privacy cost: ε with its δ, the accountant, what it protects."""

from __future__ import annotations

from rich.console import Console

from shoal.cli.display import summary_table
from shoal.experiment import ParadigmResult


def render(results: list[ParadigmResult]) -> str:
    console = Console(record=True, width=250)
    console.print(summary_table(results))
    return console.export_text()


def test_the_table_shows_epsilon_delta_accountant_and_what_is_protected() -> None:
    privacy = {"mode": "sample", "epsilon": 4.8123, "delta": 1e-5, "accountant": "pld",
               "protects": "each training example of each client"}
    fed = ParadigmResult("federated", 3, {"accuracy": 0.9}, 100.0, 1e6, 1.0, privacy=privacy)
    base = ParadigmResult("centralized", 3, {"accuracy": 0.95}, 100.0, 1e5, 1.0)
    lines = render([fed, base]).splitlines()
    header = next(line for line in lines if "paradigm" in line)
    assert header.split()[-4:] == ["ε", "δ", "accountant", "protects"]
    row = next(line for line in lines if line.lstrip().startswith("federated"))
    assert " ".join(row.split()[-9:]) == "4.81 1e-05 PLD each training example of each client"
    baseline = next(line for line in lines if line.lstrip().startswith("centralized"))
    assert baseline.split()[-2:] == ["no", "DP"]


def test_no_privacy_columns_without_dp() -> None:
    base = ParadigmResult("centralized", 3, {"accuracy": 0.95}, 100.0, 1e5, 1.0)
    assert "accountant" not in render([base])
