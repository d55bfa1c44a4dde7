"""The memory planner (memlab.planner, ``memlab plan``): sizes, a pinned fit, the CLI."""

import pytest

from memlab import planner
from memlab.cli import main
from memlab.lab import Config, estimate_config

# a tiny deep speaker net: each estimate on fake tensors takes a second or two
TINY = dict(task="speaker", model="dfresnet", blocks=(1, 1, 4, 1), width=8, embed_dim=32,
            batch_size=4, seconds=0.5, num_speakers=6)


def _peak(**choices):
    return estimate_config(Config(**TINY, **choices), steps=2).peak


@pytest.mark.parametrize("text, expected", [("11GB", 11 * 10**9), ("11GiB", 11 * 2**30),
                                            ("11G", 11 * 2**30), ("512MiB", 512 * 2**20),
                                            ("1.5 GB", 1_500_000_000), ("4096", 4096),
                                            (2**20, 2**20)])
def test_parse_size(text, expected):
    assert planner.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "11XB", "GB", "-1GB", "0", "nan", True, None, [1]])
def test_parse_size_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="fit must be"):
        planner.parse_size(bad)


def test_step_factor_uses_measured_ratios():
    f, notes, missing = planner.step_factor({"memory": "reversible", "optimizer": "adam8bit"},
                                            "resnet")
    assert f == pytest.approx(1.44)             # the optimizer step's factor is shown only
    assert any("adam8bit" in n and "optimizer step" in n for n in notes) and not missing
    f, _, missing = planner.step_factor({"memory": "vanilla", "precision": "bf16"})
    assert f == 1.0 and missing == ["precision=bf16"]
    for table in planner.MEASURED.values():
        for m in table.values():
            assert m.command and m.machine and m.ratio > 0


def test_pinned_fit_vanilla_over_reversible_full_adam8bit_first(one_thread):
    """Vanilla/Adam does not fit; only reversible-full + Adam8bit does: it is listed first."""
    target = _peak(memory="reversible-full", optimizer="adam8bit")
    budget = target + 1024
    assert _peak() > budget and _peak(memory="reversible-full") > budget
    result = planner.plan(Config(**TINY), budget, kinds=("memory", "optimizer"),
                          choices={"optimizer": ("adam", "adam8bit")})
    assert not result.base["fits"] and result.base["peak"] > budget
    assert result.rows, planner.format_plan(result)
    first = result.rows[0]
    assert first["choices"] == {"memory": "reversible-full", "optimizer": "adam8bit"}
    assert first["peak"] == target and first["peak"] <= budget
    assert all(r["peak"] <= budget for r in result.rows)
    assert first["peak"] == sum(first[c] for c in ("parameters", "gradients", "optimizer",
                                                   "activations", "other"))
    text = planner.format_plan(result)
    assert "does not fit" in text and "reversible-full, adam8bit" in text


def test_plan_lists_cheapest_first(one_thread):
    result = planner.plan(Config(**TINY), "1GiB", kinds=("memory",))
    assert [r["run"] for r in result.rows][0] == "as given"      # vanilla fits: no cost
    factors = [r["time_factor"] for r in result.rows if not r["not_measured"]]
    assert factors == sorted(factors)


def test_cli_plan(capsys, one_thread):
    rc = main(["plan", "--scenario", "deep-speaker", "--fit", "2GiB", "--vary", "memory",
               "--memory", "vanilla,reversible"])
    out = capsys.readouterr().out
    assert rc == 0 and "budget 2.00 GiB" in out and "reversible" in out
    assert "step_time" in out


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--fit", "eleven"], "fit must be a size"),
    (["plan", "--fit", "11GB", "--scenario", "nope"], "scenario must be one of"),
    (["plan", "--fit", "11GB", "--vary", "colour"], "vary must name kinds"),
    (["plan", "--fit", "11GB", "--memory", "magic"], "memory must be one of"),
    (["plan", "--fit", "11GB", "--full-size"], "needs --scenario"),
    (["plan", "--fit", "11GB", "--blocks", "3,x"], "blocks must be"),
])
def test_cli_plan_bad_values_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("memlab plan: error")
