"""scripts/bench_lora.py at a tiny size: its figures and ratios are all there and sane, never its speed."""

from __future__ import annotations

import importlib



def test_tiny_run_reports_every_figure(capsys):
    bench = importlib.import_module("scripts.bench_lora")
    report = bench.main(["--size", "64", "--steps", "1", "--rank", "4", "--repeats", "1", "--device", "cpu"])
    assert set(report) >= {"plain_batch4_s", "one_lora_batch4_s", "mixed_4_loras_batch4_s", "grouped_4x_batch1_s",
                           "first_use_s", "cached_use_s", "first use / cached"}
    assert all(value > 0 for value in report.values())
    printed = capsys.readouterr().out
    assert "4 LoRAs mixed in 1 batch / 4 batches of 1" in printed and "rank 4" in printed
