"""`memlab bench peers` (fast mode): every installed peer is checked against a reference before
it is timed; missing peers are listed, not silently dropped. Timings are reported, not asserted."""

import warnings

import pytest

from memlab.bench import peers

# pytest-xdist (-n 2 --dist loadgroup): its module fixtures are built once
pytestmark = pytest.mark.xdist_group("test_bench_peers")


@pytest.fixture(scope="module")
def rows():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peers.run(fast=True, threads=1)


def test_every_workload_has_its_baseline_and_memlab(rows):
    by = {(r["workload"], r["subject"]): r for r in rows}
    for workload, baseline, ours in (("adam-step", "torch-fused", "memlab-adam8bit"),
                                     ("sgd-step", "torch-fused", "memlab-sgd8bit"),
                                     ("reversible-stage", "plain-autograd", "memlab-reversible"),
                                     ("rnnt-loss", "torchaudio-batched", "memlab-samplewise"),
                                     ("rnnt-pruned", "memlab-pruned", "memlab-samplewise-pruned")):
        assert by[workload, baseline]["ratio"] == 1.0
        r = by[workload, ours]
        assert r["ok"] and r["ms"] > 0 and r["max_diff"] is not None


def test_checks_hold_for_memlab(rows):
    by = {(r["workload"], r["subject"]): r for r in rows}
    assert by["adam-step", "memlab-adam8bit"]["max_diff"] < 0.05
    assert by["adam-step", "memlab-adam8bit"]["state_bytes_per_param"] <= 2.04
    assert by["reversible-stage", "memlab-reversible"]["max_diff"] < 1e-5
    assert by["rnnt-loss", "memlab-samplewise"]["max_diff"] < 1e-4
    for ours in ("memlab-pruned", "memlab-samplewise-pruned"):      # the whole band: exact
        assert by["rnnt-pruned", ours]["max_diff"] < 1e-5
        assert by["rnnt-pruned", ours]["s_range"] == 5


def test_missing_peers_are_listed_and_failed_checks_not_timed(rows):
    listed = {r["subject"] for r in rows if r.get("status") == "missing"}
    for p in peers.PEERS:
        assert (p in listed) == (not peers._have(p))
    for r in rows:
        if r.get("ok") is False:
            assert r["ms"] is None and r["max_diff"] is not None


def test_bench_peers_from_the_cli(capsys, monkeypatch):
    from memlab import cli
    monkeypatch.setattr(peers, "run", lambda fast=False: [dict(workload="w", subject="s",
                                                                ratio=1.0)])
    assert cli.main(["bench", "peers", "--fast"]) == 0
    assert "Peers" in capsys.readouterr().out


def test_rnnt_rows_check_against_the_exact_lattice_not_torchaudio():
    """At T=100, U=20 torchaudio's gradients are ~1.2e-4 off the exact ones (finite differences
    agree with memlab's float64 reference lattice to 1e-10): checked against torchaudio with a
    1e-4 tolerance, memlab's exact sample-wise loss failed its check and was not timed."""
    rows = peers.rnnt_rows(B=2, T=100, U=20, V=64, H=16, repeats=1)
    by = {r["subject"]: r for r in rows}
    assert by["memlab-samplewise"]["ok"] and by["memlab-samplewise"]["max_diff"] < 1e-5
    assert by["torchaudio-batched"]["ok"]
    assert 1e-5 < by["torchaudio-batched"]["max_diff"] < peers.RNNT_TOLERANCE
    assert "float64 reference" in by["memlab-samplewise"]["check"]


def test_reversible_rows_cover_both_couplings_and_two_depths(rows):
    ours = [r for r in rows if r["subject"] == "memlab-reversible"]
    assert {(r["coupling"], r["depth"]) for r in ours} == {
        (c, d) for c in ("conv", "bottleneck") for d in (2, 4)}
    assert all(r["ok"] and r["max_diff"] < 1e-5 for r in ours)
    bases = [r for r in rows if r["subject"] == "plain-autograd"]
    assert len(bases) == 4 and all(r["ratio"] == 1.0 for r in bases)
