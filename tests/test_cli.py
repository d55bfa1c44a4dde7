"""The memlab command line, run in-process through memlab.cli.main and as an installed script."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from memlab.cli import format_table, main


def test_help_lists_commands_and_strategies(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("compare", "bench", "lab", "data"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "adam8bit" in out and "reversible" in out and "samplewise" in out


def test_compare_json_rows(capsys):
    rc = main(["compare", "--task", "speaker", "--steps", "3", "--optimizer", "adam,sgd",
               "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["config"]["optimizer"] for r in rows] == ["adam", "sgd"]
    for r in rows:
        assert r["peak"] == sum(r[c] for c in ("parameters", "gradients", "optimizer",
                                                "activations", "other"))
        assert 0 <= r["eer"] <= 1 and r["step_s"] > 0
    # SGD momentum keeps 1 buffer per parameter, Adam 2: the optimizer column shows it
    assert rows[0]["optimizer"] > rows[1]["optimizer"]
    assert "untrained_eer" in rows[0]


def test_compare_table_for_asr(capsys):
    assert main(["compare", "--task", "asr", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "ter" in out and "peak" in out and "activations" in out


def test_compare_unknown_strategy_is_a_clear_error(capsys):
    assert main(["compare", "--optimizer", "adamm"]) == 2
    err = capsys.readouterr().err
    assert "optimizer must be one of" in err and "'adamm'" in err


def test_bench_unknown_name(capsys):
    assert main(["bench", "nonsense"]) == 2
    assert "name must be one of" in capsys.readouterr().err


def test_lab_dry_run_copies_notebooks_and_prints_address(tmp_path, capsys):
    pytest.importorskip("jupyterlab")
    dest = tmp_path / "nbs"
    assert main(["lab", "--dir", str(dest), "--dry-run", "--port", "8765"]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8765/lab/tree/00_where_memory_goes.ipynb?token=" in out
    assert (dest / "00_where_memory_goes.ipynb").exists()
    cmdline = out.strip().splitlines()[-1]
    assert "--ServerApp.ip=127.0.0.1" in cmdline
    # the token travels in the environment: /proc/<pid>/cmdline is world-readable
    token = out.split("?token=")[1].split()[0]
    assert token not in cmdline and ".token=" not in cmdline


def test_data_writes_wavs_and_manifest(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["data", "--task", "speaker", "--out", str(out), "--num-speakers", "2",
                 "--utts", "2", "--seconds", "0.5"]) == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4
    rec = json.loads(lines[0])
    assert (out / rec["path"]).exists() or os.path.exists(rec["path"])


def test_format_table_humanises_bytes():
    t = format_table([{"run": "a", "peak": 3 * 2**20, "step_s": 0.25}])
    assert "3.00 MiB" in t and "0.25" in t


def test_installed_console_script_runs():
    exe = shutil.which("memlab") or os.path.join(os.path.dirname(sys.executable), "memlab")
    if not os.path.exists(exe):
        pytest.skip("memlab console script not installed in this environment")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "compare" in res.stdout
