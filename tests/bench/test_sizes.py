"""llm_entreg.bench.sizes: one process runs every (V, N) point; table, JSON and log-log plot are written."""

from __future__ import annotations

import json

from llm_entreg.bench import sizes as bench_sizes


def test_tiny_size_sweep_writes_table_json_and_plot(tmp_path):
    args = bench_sizes.build_parser().parse_args(
        ["--ns", "32,64", "--vocabs", "301,1001", "--d", "16", "--dtype", "fp32", "--impls", "naive,ours_chunked",
         "--repeats", "1", "--warmup", "0", "--memory", "off", "--device", "cpu", "--out", str(tmp_path)])
    report = bench_sizes.run_sizes(args, log=lambda s: None)
    pts = report["points"]
    assert [(p["vocab"], p["n"]) for p in pts] == [(301, 32), (301, 64), (1001, 32), (1001, 64)]
    for p in pts:
        assert p["matmul_tflops"] > 0
        for spec in ("naive", "ours_chunked"):
            assert p["impls"][spec]["status"] == "ok" and p["impls"][spec]["fwdbwd_ms"] > 0
    on_disk = json.loads((tmp_path / "sizes.json").read_text())
    assert len(on_disk["points"]) == 4
    md = (tmp_path / "sizes.md").read_text()
    assert "| 1001 | 64 |" in md and "ours_chunked" in md
    png = (tmp_path / "sizes.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
