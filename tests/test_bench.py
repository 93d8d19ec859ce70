"""The benchmark's bookkeeping (its timings are printed by `python -m cnexp.bench`, never asserted)."""

from cnexp.bench.tiny import LEVERS, cnexp_cmd, peer_losses, summarize


def test_peer_losses_read_the_tqdm_postfix_only():
    out = "5%| 1/20 [00:01, loss=0.0561, lr=0.001]\r10%| 2/20 [loss=1.2e-05, lr=0.001] step_loss=9"
    assert peer_losses(out) == [0.0561, 1.2e-05]


def test_cnexp_command_turns_off_evaluation_and_adds_the_lever(tmp_path):
    cmd = cnexp_cmd(7, tmp_path / "run", tmp_path / "data", True, LEVERS["compile"])
    assert "trainer.max_steps=7" in cmd and "eval.enabled=false" in cmd
    assert "cache.latents=True" in cmd and cmd[-1] == "trainer.compile=true"


def test_summary_takes_the_median_round_and_the_ratio_to_the_peer(tmp_path, capsys):
    peer = "diffusers train_controlnet.py"
    results = [{"name": "cnexp", "step_s": s, "peak_rss_mib": 100, "fixed_s": 1.0, "outputs": []}
               for s in (0.10, 0.12, 0.50)]
    results += [{"name": peer, "step_s": s, "peak_rss_mib": 90, "fixed_s": 2.0,
                 "outputs": ["loss=0.5, lr=1 loss=0.3, lr=1"]} for s in (0.24, 0.24, 0.24)]
    run = tmp_path / "runs" / "cnexp_l2" / "csv"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("step,train/loss\n0,0.6\n1,0.4\n")
    args = type("Args", (), {"steps": 60, "rounds": 3})()
    rows = {r["trainer"]: r for r in summarize(results, {"cnexp": 0, peer: 0}, tmp_path, args)}
    assert rows["cnexp"]["step_s"] == 0.12 and rows["cnexp"]["ratio"] == 2.0
    assert rows[peer]["ratio"] == 1.0
    printed = capsys.readouterr().out
    assert "loss cnexp: first half 0.6000" in printed and f"loss {peer}: first half 0.5000" in printed
