"""scripts/bench_img2img.py at a tiny size: its figures are all there, and the call counts are the
schedule's (8 steps at strength 0.5: half), never its speed."""

from __future__ import annotations

import importlib


def test_tiny_run_reports_calls_and_time_ratios(capsys):
    bench = importlib.import_module("scripts.bench_img2img")
    report = bench.main(["--size", "64", "--steps", "8", "--strength", "0.5", "--repeats", "1", "--device", "cpu"])
    assert (report["text_to_image_calls"], report["image_to_image_calls"], report["inpainting_calls"]) == (8, 4, 4)
    assert report["image_to_image / text_to_image calls"] == 0.5
    assert all(report[f"{name}_s"] > 0 for name in ("text_to_image", "image_to_image", "inpainting"))
    assert report["image_to_image_denoising_s"] > 0
    assert "image_to_image / text_to_image: calls 0.50x, time " in capsys.readouterr().out
