"""User mistakes at the CLI: one clear line on stderr and a non-zero exit, never a traceback.

Also pins `memlab lab`'s launch (token off the command line, no news / update checks) and the
memory check that `memlab compare` runs before training.
"""

import functools
import inspect
import json
import math
import os
import re
import stat

import pytest

import memlab.cli as cli
from memlab.cli import main
from memlab.lab import Config, estimate_config


def one_line_error(err: str, *needles: str) -> None:
    """stderr holds exactly one non-empty line, an error naming every needle."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("memlab") and "error:" in lines[0], err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a training run starts (errors must come before any run)."""
    def boom(*a, **k):
        raise AssertionError("a training run started")
    monkeypatch.setattr(cli, "_run_one", boom)


# ----------------------------------------------------------------------------- 1. lab
def _launch(monkeypatch, tmp_path, capsys, extra=()):
    pytest.importorskip("jupyterlab")
    seen = {}

    def fake_call(cmd, env=None, **kw):
        seen["cmd"], seen["env"] = list(cmd), dict(env or {})
        cfg_dir = seen["env"]["JUPYTER_CONFIG_PATH"].split(os.pathsep)[0]
        page = os.path.join(cfg_dir, "labconfig", "page_config.json")
        seen["page_config"] = json.load(open(page))
        seen["mode"] = stat.S_IMODE(os.stat(page).st_mode)
        seen["dir_mode"] = stat.S_IMODE(os.stat(cfg_dir).st_mode)
        # what the installed jupyterlab_server reads from that environment
        monkeypatch.setenv("JUPYTER_CONFIG_PATH", seen["env"]["JUPYTER_CONFIG_PATH"])
        from jupyterlab_server.config import get_page_config
        seen["server_page_config"] = get_page_config([], None)
        seen["cfg_dir"] = cfg_dir
        return 0

    monkeypatch.setattr(cli.subprocess, "call", fake_call)
    assert main(["lab", "--dir", str(tmp_path / "nbs"), "--no-browser", "--port", "8799",
                 *extra]) == 0
    out = capsys.readouterr().out
    token = re.search(r"\?token=([0-9a-f]+)", out).group(1)
    return seen, token


def test_lab_token_is_not_on_the_command_line(monkeypatch, tmp_path, capsys):
    seen, token = _launch(monkeypatch, tmp_path, capsys)
    argv = " ".join(seen["cmd"])
    assert token not in argv and ".token=" not in argv
    assert seen["env"]["JUPYTER_TOKEN"] == token  # read by the IdentityProvider
    assert "--ServerApp.ip=127.0.0.1" in seen["cmd"]
    assert not os.path.exists(seen["cfg_dir"])            # the private folder is removed afterwards


def test_lab_turns_news_and_update_checks_off(monkeypatch, tmp_path, capsys):
    seen, _ = _launch(monkeypatch, tmp_path, capsys)
    plugin = "@jupyterlab/apputils-extension:announcements"
    # the announcements plugin (the "notified about official Jupyter news?" prompt, the news
    # feed and the update check) is disabled in the page config jupyterlab_server will serve
    assert seen["page_config"]["disabledExtensions"][plugin] is True
    assert plugin in seen["server_page_config"]["disabledExtensions"]
    assert seen["mode"] == 0o600 and seen["dir_mode"] == 0o700
    # and the server side never fetches: no news feed, no update check, no PyPI listing
    assert "--LabApp.news_url=None" in seen["cmd"]
    assert "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate" in seen["cmd"]
    assert "--LabApp.extension_manager=readonly" in seen["cmd"]


def test_lab_keeps_a_users_own_config_path(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", str(tmp_path / "mine"))
    seen, _ = _launch(monkeypatch, tmp_path, capsys)
    assert seen["env"]["JUPYTER_CONFIG_PATH"].split(os.pathsep)[1:] == [str(tmp_path / "mine")]


# ----------------------------------------------------------------------------- 2. memory check
def test_compare_refuses_a_run_that_does_not_fit(monkeypatch, capsys, no_training):
    monkeypatch.setattr(cli, "_available_memory", lambda device: (2**20, "MemAvailable"))
    assert main(["compare", "--steps", "2"]) == 2
    one_line_error(capsys.readouterr().err, "estimated", "1.00 MiB", "available", "--force")


def test_compare_force_skips_the_memory_check(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_available_memory", lambda device: (2**20, "MemAvailable"))
    ran = []
    monkeypatch.setattr(cli, "_run_one", lambda cfg, *a, **k: ran.append(cfg) or _fake_row(cfg))
    assert main(["compare", "--steps", "2", "--force", "--json"]) == 0
    assert len(ran) == 1


def test_compare_width_2000_is_refused_before_allocating(capsys, no_training, monkeypatch):
    monkeypatch.setattr(cli, "_available_memory", lambda device: (8 * 2**30, "MemAvailable"))
    monkeypatch.delenv("MEMLAB_FAST")          # the real default sizes: ~89 GiB at width 2000
    assert main(["compare", "--width", "2000"]) == 2
    one_line_error(capsys.readouterr().err, "GiB", "8.00 GiB available")


def test_memory_check_counts_every_local_cpu_rank(monkeypatch):
    """--nproc N on CPU: the estimate is one rank's, and the N local ranks share this host's
    memory, so the check asks for N times it (a per-rank figure that fits alone may not)."""
    from memlab.lab import Config
    cfg = Config.for_task("speaker", parallel="ddp", nproc=2, batch_size=4)
    monkeypatch.setattr(cli, "_estimated_peak", lambda c: (600 * 2**20, True))
    monkeypatch.setattr(cli, "_available_memory", lambda device: (1000 * 2**20, "MemAvailable"))
    cli.check_memory([cfg.replace(parallel="none", nproc=1)])        # one process: 600 fits
    with pytest.raises(ValueError, match="1.17 GiB"):                 # 2 x 600 MiB does not
        cli.check_memory([cfg])


def test_available_memory_reads_meminfo():
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("Linux only")
    avail, where = cli._available_memory("cpu")
    assert isinstance(avail, int) and avail > 0 and where == "MemAvailable"


def test_compare_batch_larger_than_the_training_set_is_rejected(capsys, no_training):
    assert main(["compare", "--batch-size", "100000"]) == 2
    # fast mode: 6 speakers x 4 utterances
    one_line_error(capsys.readouterr().err, "batch_size", "100000", "24")


@pytest.mark.parametrize("kw", [dict(batch_size=0), dict(batch_size=-3), dict(frames=0),
                                dict(num_classes=0), dict(target_len=0),
                                dict(batch_size=2.5), dict(batch_size=True)])
def test_estimate_config_rejects_bad_sizes(kw):
    name = next(iter(kw))
    with pytest.raises((ValueError, TypeError), match=name):
        estimate_config(Config.for_task("speaker"), **kw)


@pytest.mark.parametrize("kw", [dict(lr=math.inf), dict(lr=math.nan), dict(lr=-1.0),
                                dict(lr=True), dict(weight_decay=math.nan),
                                dict(weight_decay=-0.1), dict(weight_decay=math.inf),
                                dict(warmup=math.nan), dict(budget=math.inf),
                                dict(budget=True), dict(seconds=True), dict(seconds=math.nan),
                                dict(seed=-1), dict(seed=1.5), dict(device="meta"),
                                dict(optimizer_kwargs=None)])
def test_config_rejects_bad_numbers(kw):
    name = next(iter(kw))
    with pytest.raises((ValueError, TypeError), match=name):
        Config.for_task("speaker", **kw).validate()


# ----------------------------------------------------------------------------- 3. CLI mistakes
@pytest.mark.parametrize("argv,needles", [
    (["--memory", ","], ["memory"]),
    (["--optimizer", ""], ["optimizer"]),
    (["--task", "asr", "--loss", " , "], ["loss"]),
    (["--device", "meta"], ["device", "meta"]),
    (["--lr", "inf"], ["lr", "inf"]),
    (["--lr", "nan"], ["lr", "nan"]),
    (["--lr", "-1"], ["lr", "-1"]),
    (["--steps", "0"], ["steps"]),
    (["--loss", "samplewise"], ["loss", "asr"]),
])
def test_compare_mistakes_are_one_line(argv, needles, capsys, no_training):
    assert main(["compare", *argv]) == 2
    one_line_error(capsys.readouterr().err, *needles)


@pytest.mark.parametrize("argv,needles", [
    (["--num-speakers", "-2"], ["num-speakers"]),
    (["--num-speakers", "1"], ["num-speakers"]),
    (["--utts", "0"], ["utts"]),
    (["--task", "asr", "--num-speakers", "-2", "--utts", "-5"], ["num-speakers"]),
    (["--seconds", "nan"], ["seconds"]),
    (["--seconds", "-1"], ["seconds"]),
    (["--vocab-size", "1", "--task", "asr"], ["vocab-size"]),
    (["--seed", "-1"], ["seed"]),
])
def test_data_bad_values_are_one_line(argv, needles, tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["data", "--out", str(out), *argv]) == 2
    one_line_error(capsys.readouterr().err, *needles)
    assert not out.exists() or not any(out.iterdir())


def test_data_refuses_a_non_empty_folder_without_force(tmp_path, capsys):
    out = tmp_path / "corpus"
    small = ["--num-speakers", "2", "--seconds", "0.3"]
    assert main(["data", "--out", str(out), "--utts", "3", *small]) == 0
    assert len(list((out / "wav").iterdir())) == 6
    capsys.readouterr()
    assert main(["data", "--out", str(out), "--utts", "1", *small]) == 2
    one_line_error(capsys.readouterr().err, str(out), "--force")
    assert len(list((out / "wav").iterdir())) == 6           # untouched
    assert main(["data", "--out", str(out), "--utts", "1", *small, "--force"]) == 0
    # no stale wavs of the earlier corpus are left beside the new manifest
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 2 and len(list((out / "wav").iterdir())) == 2


def test_data_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["data", "--out", str(f)]) == 2
    one_line_error(capsys.readouterr().err, "folder")


@pytest.mark.parametrize("name,preset", [("optim", "paper"), ("reversible", "paper"),
                                         ("transducer", "nonsense"), ("lowrank", "paper")])
def test_bench_unknown_preset_is_one_line(name, preset, capsys, monkeypatch):
    import importlib
    mod = importlib.import_module(f"memlab.bench.{name}")
    real = mod.run

    takes_preset = "preset" in inspect.signature(real).parameters

    @functools.wraps(real)  # the same signature, seen through __wrapped__
    def guarded(*a, **k):  # a bench without presets must not start at all
        assert takes_preset, "bench ran with a preset it does not take"
        return real(*a, **k)
    monkeypatch.setattr(mod, "run", guarded)
    assert main(["bench", name, "--preset", preset]) == 2
    one_line_error(capsys.readouterr().err, "preset", repr(preset))


@pytest.mark.parametrize("where", ["missing_dir/rows.json", "a_file/rows.json", "."])
def test_bench_out_unwritable_fails_before_the_benchmark(where, tmp_path, capsys, monkeypatch):
    import memlab.bench.optim as mod
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(mod, "run", lambda *a, **k: pytest.fail("benchmark ran"))
    assert main(["bench", "optim", "--out", str(tmp_path / where)]) == 2
    one_line_error(capsys.readouterr().err, "--out")
    assert not (tmp_path / "missing_dir").exists()


def test_bench_out_check_leaves_no_file_behind(tmp_path, capsys, monkeypatch):
    import memlab.bench.optim as mod
    target = tmp_path / "rows.json"
    monkeypatch.setattr(mod, "run", lambda *a, **k: [{"name": "x", "bytes": 1}])
    assert main(["bench", "optim", "--out", str(target)]) == 0
    assert json.loads(target.read_text()) == [{"name": "x", "bytes": 1}]


def _fake_row(cfg):
    row = {"run": cfg.label, "peak": 10}
    row.update({c: 2 for c in ("parameters", "gradients", "optimizer", "activations", "other")})
    row.update(step_s=0.01, final_loss=1.0, eer=0.25, accuracy=0.5)
    return row


def test_ctrl_c_during_compare_prints_finished_rows_and_exits_130(capsys, monkeypatch):
    calls = []

    def run_one(cfg, *a, **k):
        calls.append(cfg.optimizer)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_row(cfg)
    monkeypatch.setattr(cli, "_run_one", run_one)
    assert main(["compare", "--optimizer", "adam,sgd,adamw"]) == 130
    cap = capsys.readouterr()
    assert "resnet vanilla d1 w8 B4 adam " in cap.out and " sgd" not in cap.out
    assert calls == ["adam", "sgd"]
    assert "Traceback" not in cap.err and "interrupted" in cap.err and "1 of 3" in cap.err


def test_ctrl_c_json_prints_the_finished_rows(capsys, monkeypatch):
    calls = []

    def run_one(cfg, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_row(cfg)
    monkeypatch.setattr(cli, "_run_one", run_one)
    assert main(["compare", "--optimizer", "adam,sgd", "--json"]) == 130
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def run_one(cfg, *a, **k):
        raise RuntimeError("a real bug")
    monkeypatch.setattr(cli, "_run_one", run_one)
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["compare"])


def test_value_errors_become_one_line_and_debug_shows_them(monkeypatch, capsys):
    def run_one(cfg, *a, **k):
        raise ValueError("width must be even, got 7")
    monkeypatch.setattr(cli, "_run_one", run_one)
    assert main(["compare"]) == 2
    one_line_error(capsys.readouterr().err, "width must be even, got 7")
    monkeypatch.setenv("MEMLAB_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["compare"])
