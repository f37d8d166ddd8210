"""The plain-language reading, from known numbers (exact texts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoal.report import FIGURES, Entry, ReportData, reading
from shoal.report.fmt import fmt_bytes, fmt_number, fmt_ratio, fmt_seconds


def entry(name: str, paradigm: str | None = None, status: str = "finished",
          history: list[dict[str, Any]] | None = None, audit: dict[str, Any] | None = None,
          **figures: Any) -> Entry:
    return Entry(name, paradigm or name, status, {k: figures.get(k) for k in FIGURES},
                 history or [], audit or {})


def data(*entries: Entry, primary: str = "accuracy", lower: bool = False) -> ReportData:
    return ReportData("comparison", Path("cmp"), {}, "", list(entries), primary, lower)


CENTRAL = entry("centralized", accuracy=0.960, bytes_total=1.0e6, rounds=20)


def test_dp_federated_against_centralized_reads_its_cost_traffic_and_leakage():
    fed = entry("federated-dp", "federated", accuracy=0.919, epsilon=3.0, bytes_total=12.2e6,
                accuracy_worst_client=0.7,
                history=[{"leak/label_auc_norm": 0.50}, {"leak/label_auc_norm": 0.571,
                                                         "leak/label_auc_direction": 0.55}],
                audit={"membership": {"auc": 0.512}, "lira": {"skipped": "no shadow models"},
                       "epsilon": {"eps_lower_bound": 0.8123, "eps_accountant": 3.0},
                       "inversion": {"clients_exposed": 3, "clients_attacked": 10}})
    assert reading(data(CENTRAL, fed)) == [
        "centralized (the pooled-data baseline) reaches accuracy 0.960 in 20 rounds and "
        "moves 1.0 MB.",
        "federated-dp with DP at ε = 3 costs 4.1 points of accuracy (0.919 against 0.960) "
        "and moves 12× the bytes of centralized; its worst client reaches accuracy 0.700; "
        "label leakage AUC 0.57; canary audit measures ε ≥ 0.81; gradient inversion recovered 3 "
        "of 10 clients' inputs; membership inference AUC 0.51."]


def test_a_gain_a_match_and_fewer_bytes_read_as_such():
    better = entry("swarm", accuracy=0.9705, bytes_total=3.1e5)
    same = entry("split", accuracy=0.9601, bytes_total=2.5e6)
    lines = reading(data(better, same, CENTRAL))
    assert lines == [
        "centralized (the pooled-data baseline) reaches accuracy 0.960 in 20 rounds and "
        "moves 1.0 MB.",
        "swarm gains 1.1 points of accuracy (0.971 against 0.960) and moves 0.31× the bytes "
        "of centralized.",
        "split matches its accuracy (0.960 against 0.960) and moves 2.5× the bytes of "
        "centralized.",
        "Best accuracy: swarm (0.971); fewest bytes: swarm (310.0 kB)."]


def test_missing_figures_drop_their_clause_and_unfinished_variants_are_listed():
    unmeasured = entry("federated", bytes_total=None, accuracy=0.9)
    blank = entry("swarm")
    pending = entry("split", status="pending")
    failed = Entry("data-parallel", "data_parallel", "failed", dict.fromkeys(FIGURES),
                   reason="WorkerError: rank 1 died")
    assert reading(data(CENTRAL, unmeasured, blank, pending, failed)) == [
        "centralized (the pooled-data baseline) reaches accuracy 0.960 in 20 rounds and "
        "moves 1.0 MB.",
        "federated costs 6.0 points of accuracy (0.900 against 0.960).",
        "swarm has no figures measured.",
        "Best accuracy: centralized (0.960); fewest bytes: centralized (1.0 MB).",
        "Not finished, so not read: split (pending), data-parallel (failed: WorkerError: rank 1 "
        "died)."]


def test_without_a_baseline_each_entry_reads_its_own_figures():
    assert reading(data(entry("federated", accuracy=0.8078, rounds=3, bytes_total=3.1e6,
                              epsilon=14.99))) == [
        "federated with DP at ε = 15 reaches accuracy 0.808 in 3 rounds and moves 3.1 MB."]


def test_an_error_metric_reads_as_raised_or_lowered():
    central = entry("centralized", accuracy=20.1, bytes_total=1e6)
    fed = entry("federated", accuracy=23.4, bytes_total=4e6, epsilon=None)
    best = entry("swarm", accuracy=18.0, bytes_total=5e6, epsilon=2.0)
    assert reading(data(central, fed, best, primary="rmse", lower=True)) == [
        "centralized (the pooled-data baseline) reaches RMSE 20.100 and moves 1.0 MB.",
        "federated raises RMSE from 20.1 to 23.4 and moves 4.0× the bytes of centralized.",
        "swarm with DP at ε = 2 lowers RMSE from 20.1 to 18 and moves 5.0× the bytes of "
        "centralized.",
        "Best RMSE: swarm (18.000); best with DP: swarm (18.000 at ε = 2); fewest bytes: "
        "centralized (1.0 MB)."]


def test_figures_that_were_not_measured_are_a_dash():
    assert [fmt_number(None), fmt_number(float("nan")), fmt_bytes(None), fmt_seconds("x")] \
        == ["—"] * 4
    assert [fmt_bytes(3_100_753), fmt_bytes(311_672), fmt_bytes(12), fmt_seconds(0.2571),
            fmt_seconds(41.2), fmt_seconds(750)] == ["3.1 MB", "311.7 kB", "12 B", "0.26 s",
                                                      "41 s", "12.5 min"]
    assert [fmt_ratio(12.2), fmt_ratio(3.44), fmt_ratio(0.312)] == ["12×", "3.4×", "0.31×"]
