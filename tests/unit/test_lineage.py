"""Model lineage: costs add up over the stages behind a model, a shared ancestor counts once,
and an ancestor of unknown cost makes the total unknown rather than too small."""

from __future__ import annotations

from workloads.lineage import read_lineage, totals, write_lineage


def _model(tmp_path, name):
    d = tmp_path / name / "model"
    d.mkdir(parents=True)
    return str(d)


def test_shared_ancestor_counts_once(tmp_path):
    base, e0, e1, merged = (_model(tmp_path, n) for n in ("base", "e0", "e1", "merged"))
    write_lineage(base, [], "kb", {"stage": "base", "samples": 100, "seconds": 10.0})
    write_lineage(e0, [base], "k0", {"stage": "e0", "samples": 30, "seconds": 3.0})
    write_lineage(e1, [base], "k1", {"stage": "e1", "samples": 20, "seconds": 2.0})
    write_lineage(merged, [e0, e1, base], "km", {"stage": "merge", "samples": 0, "seconds": 0.5})
    assert totals(e0) == {"train_samples": 130.0, "train_s": 13.0, "stages": 2.0}
    assert totals(merged) == {"train_samples": 150.0, "train_s": 15.5, "stages": 4.0}
    assert set(read_lineage(merged)) == {"kb", "k0", "k1", "km"}


def test_unknown_ancestor_gives_no_total(tmp_path):
    hub, ft = _model(tmp_path, "hub"), _model(tmp_path, "ft")
    write_lineage(ft, [hub], "kf", {"stage": "ft", "samples": 10, "seconds": 1.0})
    assert totals(ft) == {} and totals(hub) == {}
    assert any(e.get("unknown") for e in read_lineage(ft).values())
