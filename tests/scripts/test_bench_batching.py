"""scripts/bench_batching.py at a tiny size: the report's shape and sanity, never its speed."""

from __future__ import annotations

import importlib
import json



def load_script():
    module = importlib.import_module("scripts.bench_batching")
    return module


def test_tiny_run_writes_a_sane_report(handler_module, tmp_path, capsys):
    bench = load_script()
    report = bench.main(["--size", "64", "--steps", "1", "--repeats", "1", "--out-dir", str(tmp_path)])

    files = list(tmp_path.glob("batching-*.json"))
    assert [str(f) for f in files] == [report["path"]]
    saved = json.loads(files[0].read_text())
    assert set(saved) >= {"benchmark", "created", "command", "machine", "settings", "results", "duration_s"}
    assert set(saved["machine"]) >= {"cpu_count", "cpu_model", "torch_threads", "platform", "device"}
    assert saved["machine"]["cpu_count"] >= 1 and saved["machine"]["torch_threads"] >= 1
    assert saved["settings"] | {"size": 64, "steps": 1, "repeats": 1, "workflow": "z-image-simple"} == saved["settings"]
    assert saved["settings"]["max_batch"] >= 1

    scenarios = saved["results"]["scenarios"]
    expected_jobs = {"one_job_8_images": 1, "8_jobs_1_image_in_a_row": 8,
                     "4_jobs_2_images_concurrent": 4, "4_jobs_2_images_in_a_row": 4}
    assert {name: row["jobs"] for name, row in scenarios.items()} == expected_jobs
    for name, row in scenarios.items():
        assert row["images"] == 8, name
        assert row["wall_s_p50"] > 0 and row["images_per_s"] > 0 and len(row["wall_s_runs"]) == 1
        # every image went through some batch, and no batch was bigger than the limit
        assert all(sizes and max(sizes) <= saved["settings"]["max_batch"] for sizes in row["batch_sizes_per_job"])
    assert all(sizes == [1] for sizes in scenarios["8_jobs_1_image_in_a_row"]["batch_sizes_per_job"])
    assert set(saved["results"]["comparisons"]) == {"one_job_vs_in_a_row_speedup", "concurrent_vs_in_a_row_speedup"}

    streaming = saved["results"]["streaming_8_images"]
    assert streaming["images"] == 8
    assert 0 < streaming["first_image_s_p50"] <= streaming["whole_job_s_p50"]
    assert 0 < streaming["first_image_fraction"] <= 1
    assert "images/s" in capsys.readouterr().out
