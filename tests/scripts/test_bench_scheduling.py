"""scripts/bench_scheduling.py at a tiny size: the report's shape and sanity, never its speed."""

from __future__ import annotations

import json

from scripts import bench_scheduling


def test_poisson_arrivals_are_seeded_and_follow_the_mix():
    first = bench_scheduling.poisson_arrivals(200, rate=4.0, share_of_eights=0.25, seed=3)
    assert first == bench_scheduling.poisson_arrivals(200, rate=4.0, share_of_eights=0.25, seed=3)
    assert first != bench_scheduling.poisson_arrivals(200, rate=4.0, share_of_eights=0.25, seed=4)
    times = [at for at, _ in first]
    assert times == sorted(times) and times[0] == 0.0 and 30 < times[-1] < 70  # 199 gaps of 0.25 s on average
    assert {images for _, images in first} == {1, 8} and 30 < sum(images == 8 for _, images in first) < 70


def test_tiny_run_writes_a_sane_report(handler_module, tmp_path, capsys):
    report = bench_scheduling.main(["--size", "64", "--poisson-size", "64", "--steps", "1", "--repeats", "1",
                                    "--jobs", "4", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / report["path"].rsplit("/", 1)[-1]).read_text())
    assert set(saved) >= {"benchmark", "created", "command", "machine", "settings", "results", "duration_s"}
    results = saved["results"]
    assert list(results) == list(bench_scheduling.SCENARIOS)
    assert results["preempt"]["one_image_ratio"] > 0 and results["preempt"]["eight_images_ratio"] > 0
    assert results["wizard"]["ratio"] > 0 and results["stream"]["stream_jobs"] >= 1
    assert 0 < results["stream"]["ratio_to_bound"]
    poisson = results["poisson"]
    assert poisson["jobs"] == 4 and poisson["images"] == sum(poisson.get(f"{n}_image_jobs", 0) * n for n in (1, 8))
    assert poisson["images_per_s"] > 0 and poisson["rate_jobs_per_s"] > 0
    again = bench_scheduling.main(["--size", "64", "--steps", "1", "--repeats", "1", "--only", "preempt",
                                   "--baseline", report["path"], "--out-dir", str(tmp_path)])
    assert list(again["results"]) == ["preempt"] and "after/before" in capsys.readouterr().out
