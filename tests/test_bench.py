"""The benchmark's bookkeeping (its timings are printed by `python -m cnexp.bench`, never asserted):
the in-process step clock, when a figure is valid, the summary."""
import os
import subprocess
import sys

from cnexp.bench.child import CLOCK_ENV, read_clock
from cnexp.bench.common import PEER, judge, ratio
from cnexp.bench.tiny import LEVERS, cnexp_cmd, peer_losses, summarize
from conftest import ROOT


def test_peer_losses_read_the_tqdm_postfix_only():
    out = "5%| 1/20 [00:01, loss=0.0561, lr=0.001]\r10%| 2/20 [loss=1.2e-05, lr=0.001] step_loss=9"
    assert peer_losses(out) == [0.0561, 1.2e-05]


def test_cnexp_command_runs_under_the_clock_with_evaluation_off_and_the_lever(tmp_path):
    cmd = cnexp_cmd(7, tmp_path / "run", tmp_path / "data", True, LEVERS["compile"])
    assert cmd[1:4] == ["-m", "cnexp.bench.child", "run.py"]
    assert "trainer.max_steps=7" in cmd and "eval.enabled=false" in cmd
    assert "cache.latents=True" in cmd and cmd[-1] == "trainer.compile=true"
    assert not any(c.startswith("trainer.log_every_n_steps") for c in cmd)  # the default's


def test_a_figure_is_invalid_when_a_round_is_not_positive_or_the_rounds_disagree():
    assert judge([0.10, 0.11, 0.12]) == (0.11, None)
    assert judge([0.2]) == (0.2, None)
    step, why = judge([-1.5676, 0.1086])  # the compile row the wall-time difference printed
    assert step is None and "-1.5676" in why
    step, why = judge([0.10, 0.14], tolerance=0.25)  # 40 % apart
    assert step is None and "40%" in why and "25%" in why
    assert judge([0.10, 0.12], tolerance=0.25) == (0.11, None)
    assert judge([float("nan"), 0.1])[0] is None and judge([])[0] is None
    assert ratio(0.2, 0.1) == 2.0 and ratio(None, 0.1) is None and ratio(0.2, None) is None


def test_the_summary_prints_every_round_and_no_ratio_for_an_invalid_figure(tmp_path, capsys):
    def rounds(name, values, out=""):
        return [{"name": name, "step_s": s, "peak_rss_mib": 100, "fixed_s": 1.0,
                 "outputs": [out]} for s in values]

    results = rounds("cnexp", (0.10, 0.12, 0.11)) + rounds("cnexp + compile", (-0.7, 0.13, 0.12))
    results += rounds(PEER, (0.24, 0.22, 0.23), "loss=0.5, lr=1 loss=0.3, lr=1")
    for name in ("cnexp", "cnexp_compile"):
        run = tmp_path / "runs" / f"{name}_l2" / "csv"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text("step,train/loss\n0,0.6\n1,0.4\n")
    args = type("Args", (), {"steps": 60, "warmup": 20, "rounds": 3, "tolerance": 0.25})()
    variants = {"cnexp": 0, "cnexp + compile": 0, PEER: 0}
    rows = {r["trainer"]: r for r in summarize(results, variants, tmp_path, args)}
    assert rows["cnexp"]["step_s"] == 0.11 and rows["cnexp"]["ratio"] == round(0.23 / 0.11, 2)
    assert rows[PEER]["ratio"] == 1.0
    compiled = rows["cnexp + compile"]
    assert compiled["step_s"] is None and compiled["ratio"] is None and compiled["invalid"]
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("cnexp + compile"))
    assert "invalid" in line and "-0.7000, 0.1300, 0.1200" in line and "x " not in line
    assert "loss cnexp: first half 0.6000" in printed and f"loss {PEER}: first half 0.5000" in printed


def test_the_child_clocks_the_steps_after_the_warmup_inside_the_process(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text("import time, torch\n"
                      "p = torch.nn.Parameter(torch.zeros(2))\n"
                      "opt = torch.optim.SGD([p], lr=0.1)\n"
                      "for i in range(8):\n"
                      "    time.sleep(0.5 if i == 0 else 0.01)  # a slow first step: warm-up\n"
                      "    p.grad = torch.ones(2)\n"
                      "    opt.step()\n")
    out = subprocess.run([sys.executable, "-m", "cnexp.bench.child", str(script)], cwd=ROOT,
                         capture_output=True, text=True, check=True,
                         env={**os.environ, CLOCK_ENV: "2,5"}).stdout
    clock = read_clock(out)
    assert clock["steps"] == 5 and len(clock["deltas"]) == 5  # steps 3..7 after step 2's end
    assert abs(clock["seconds"] - sum(clock["deltas"])) < 1e-4
    assert clock["seconds"] < 0.5  # the slow first step is outside the window
    assert read_clock("no clock here") is None
