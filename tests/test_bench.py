"""qbook.bench: the interleaved comparison harness (its arithmetic, not the machine's speed)."""

from __future__ import annotations

import pytest

from qbook import bench


def test_compare_interleaves_qbook_and_peer() -> None:
    calls: list[str] = []
    row = bench.Row("a", "b", lambda: calls.append("q"), lambda: calls.append("p"))
    (result,) = bench.compare([row], rounds=3, budget_s=0.0, warmup=1)
    assert len(result.qbook_s) == len(result.peer_s) == 3
    assert calls[:2] == ["q", "p"]  # the warm-up calls both sides
    assert "qq" not in "".join(calls[4:]) and "pp" not in "".join(calls[4:])  # then they alternate


def test_summary_arithmetic() -> None:
    row = bench.Row("a", "b", lambda: None, lambda: None, target=1.0, work=2_000_000)
    result = bench.Result(row, qbook_s=[1.0, 2.0, 4.0], peer_s=[3.0, 2.0, 2.0])
    s = result.summary()
    assert result.ratios == [3.0, 1.0, 0.5]
    assert (s["ratio_min"], s["ratio_median"], s["ratio_max"]) == (0.5, 1.0, 3.0)
    assert s["met"] is True and s["qbook_MB_per_s"] == pytest.approx(1.0)  # 2 MB in a median of 2 s


def test_compare_rejects_no_rounds() -> None:
    with pytest.raises(ValueError, match="rounds"):
        bench.compare([], rounds=0)


def test_rows_compute_what_their_peers_compute() -> None:
    """Each qbook call and its peer agree on the benchmark inputs (a benchmark of different work is void)."""
    import torch

    for row in bench.cpu_rows(
        n=1 << 12, groups=["affine", "int_matmul", "int8_matmul", "packing", "formats"]
    ):
        ours, theirs = row.qbook(), row.peer()
        if (
            "fused" in row.peer_name
            or "torchao" in row.peer_name
            or "int3" in row.name
            or "zero points" in row.name
        ):
            continue  # different output types (quantized tensors, int3 vs int4 layout) or a different product
        if isinstance(ours, tuple):
            ours, theirs = ours[0], theirs[0]
        if ours is None or theirs is None:
            continue  # fake_quantize rows return nothing (they run backward)
        if row.group == "formats" and "ml_dtypes" not in row.peer_name:
            assert torch.equal(ours, theirs), row.name
        else:
            assert torch.allclose(ours.float(), theirs.float(), rtol=1e-6, atol=1e-6), row.name


def test_provenance_names_the_machine() -> None:
    p = bench.provenance()
    assert p["versions"]["torch"] and p["torch_threads"] >= 1 and "cpu" in p


def test_geomean() -> None:
    assert bench.geomean([1.0, 4.0]) == pytest.approx(2.0)
