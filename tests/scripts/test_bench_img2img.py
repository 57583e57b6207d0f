"""scripts/bench_img2img.py at a tiny size: its figures are all there, and the call counts are the
schedule's (4 steps at strength 0.5: half; a text row and an image row together: 4 calls, not 6),
never its speed."""

from __future__ import annotations

import importlib


def test_tiny_run_reports_calls_and_time_ratios(capsys):
    bench = importlib.import_module("scripts.bench_img2img")
    report = bench.main(["--size", "64", "--steps", "4", "--strength", "0.5", "--repeats", "1", "--device", "cpu"])
    assert (report["text_to_image_calls"], report["image_to_image_calls"], report["inpainting_calls"]) == (4, 2, 2)
    assert report["image_to_image / text_to_image calls"] == 0.5
    assert (report["shared_calls"], report["one_after_the_other_calls"]) == (4, 4 + 2)  # the rows share 2 calls
    assert all(report[f"{name}_s"] > 0 for name in ("text_to_image", "image_to_image", "inpainting"))
    assert report["image_to_image_denoising_s"] > 0
    assert "image_to_image / text_to_image: calls 0.50x, time " in capsys.readouterr().out
