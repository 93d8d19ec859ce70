"""The family mode of the benchmark (`python -m cnexp.bench --family`): its judging (paired
ratios over interleaved rounds, no figure voided by a spread), its report, the bundle the SD3 and
Flux scripts can read, and the bare loop on tiny_sdxl, which must compute cnexp's own loss.
Timings are printed by the bench, never asserted here."""
import math

import pytest
import torch

from cnexp.bench.child import read_clock
from cnexp.bench.cli import build_parser
from cnexp.bench.common import judge, paired
from cnexp.bench.families import (CNEXP, LIMIT, PEERS, check_family, cnexp_overrides, peer_name,
                                  summarize)
from conftest import ROOT


def test_paired_ratios_are_round_by_round_with_their_range():
    # round 1 ran while a neighbour loaded the machine: both trainers slowed, the ratio held
    peer, mine = [0.30, 0.60, 0.31], [0.25, 0.50, 0.24]
    got = paired(peer, mine)
    assert got["rounds"] == [1.2, 1.2, round(0.31 / 0.24, 3)]
    assert got["median"] == 1.2 and got["low"] == 1.2 and got["high"] == round(0.31 / 0.24, 3)
    assert paired([0.3, 0.3], [0.2]) is None  # a round missing on one side
    assert paired([0.3, -0.1], [0.2, 0.2]) is None and paired([], []) is None
    assert paired([0.3, float("nan")], [0.2, 0.2]) is None


def test_judge_without_tolerance_keeps_a_scattered_figure():
    assert judge([0.10, 0.20, 0.12], tolerance=None) == (0.12, None)  # 100 % apart: kept
    assert judge([0.10, 0.20, 0.12])[0] is None  # the other modes' default still voids it
    assert judge([0.10, -0.2], tolerance=None)[0] is None  # a non-positive round still does


def test_the_clock_line_carries_cpu_seconds_and_old_lines_still_read():
    line = "CNEXP_CLOCK seconds=1.000000 steps=4 deltas=[0.25, 0.25, 0.25, 0.25] cpu=0.900000"
    assert read_clock(line)["cpu"] == 0.9 and read_clock(line)["steps"] == 4
    assert read_clock(line.rsplit(" cpu", 1)[0])["cpu"] is None


def test_the_flag_and_what_it_refuses(tmp_path):
    args = build_parser().parse_args(["--family", "sdxl", "--rounds", "5"])
    assert args.family == "sdxl" and args.rounds == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--family", "sd4"])
    assert check_family("sdxl", None) is None
    why = check_family("sdxl", tmp_path)  # not a diffusers checkout
    assert "train_controlnet_sdxl.py not found" in why and "--diffusers-src" in why
    assert {p.script for p in PEERS.values()} >= {"train_controlnet_sdxl.py",
                                                  "train_controlnet_sd3.py",
                                                  "train_controlnet_flux.py"}


def test_cnexp_and_the_bare_loop_get_the_same_work_as_the_script(tmp_path):
    setup = {"peer": PEERS["sdxl"], "bundle": tmp_path / "b", "data": tmp_path / "d",
             "work": tmp_path}
    over = cnexp_overrides(setup, 7, tmp_path / "run")
    assert "base=tiny_sdxl" in over and f"base.pretrained={tmp_path / 'b'}" in over
    assert "trainer.max_steps=7" in over and "data.batch_size=16" in over
    assert "trainer.checkpoint_every_n_steps=1000000" in over  # the script saves none either
    assert "eval.enabled=false" in over and "cache.latents=true" in over


def fake_results(peer: str) -> list[dict]:
    rows = []
    for rnd, (c, p, b) in enumerate([(0.25, 0.30, 0.24), (0.50, 0.60, 0.46), (0.24, 0.31, 0.23)]):
        for name, step, out in ((CNEXP, c, ""), (peer, p, "loss=0.9, lr=1 loss=0.7, lr=1"),
                                (LIMIT, b, "BARE_LOSS [0.8, 0.6]")):
            rows.append({"name": name, "step_s": step, "cpu_step_s": step * 0.98, "round": rnd,
                         "peak_rss_mib": 100, "fixed_s": 2.0, "outputs": [out]})
    return rows


def test_the_report_gives_the_median_paired_ratios_and_no_invalid_figure(tmp_path, capsys):
    setup = {"family": "sdxl", "peer": PEERS["sdxl"], "work": tmp_path, "script": "x",
             "bundle": tmp_path, "random": True}
    peer = peer_name(PEERS["sdxl"])
    args = type("Args", (), {"steps": 60, "warmup": 20, "rounds": 3})()
    report = summarize(fake_results(peer), [CNEXP, peer, LIMIT], setup, args)
    rows = {r["trainer"]: r for r in report["rows"]}
    mine = rows[CNEXP]
    assert mine["step_s"] == 0.25 and mine["invalid"] is None  # rounds 108 % apart: kept
    assert mine["vs_peer"]["median"] == 1.2 and mine["vs_peer"]["high"] == round(0.31 / .24, 3)
    assert mine["vs_bare"]["median"] == round(0.24 / 0.23, 3)  # the middle of 1.042..1.087
    assert "vs_peer" not in rows[peer] and "vs_bare" not in rows[LIMIT]
    assert report["losses"][LIMIT] == [0.8, 0.6] and report["losses"][peer] == [0.9, 0.7]
    assert report["losses"][CNEXP] == []  # no run directory: nothing recorded
    printed = capsys.readouterr().out
    assert "invalid" not in printed and "target >= 1.2x: met" in printed
    assert "target <= 1.1x: met" in printed and "0.2500, 0.5000, 0.2400" in printed


def test_the_t5_tokenizer_of_the_bench_bundle_fits_the_tiny_t5():
    from cnexp.bench.bundles import bench_bundle, t5_tokenizer
    from cnexp.tinyworld.tokenizer import build_tiny_tokenizer

    clip = build_tiny_tokenizer()
    t5 = t5_tokenizer(clip, 512)
    assert len(t5) == len(clip) and t5.model_max_length == 512
    ids = t5(["a red circle on a blue background", ""], padding="max_length", max_length=12,
             truncation=True).input_ids
    assert max(max(row) for row in ids) < len(clip)
    assert t5.convert_ids_to_tokens(ids[0])[:3] == ["\u2581a", "\u2581red", "\u2581circle"]
    assert ids[1][:2] == [t5.eos_token_id, t5.pad_token_id]
    assert bench_bundle("sdxl", ROOT / "nowhere", ROOT) == ROOT / "nowhere"  # read as it is


@pytest.fixture(scope="module", params=["tiny_sdxl", "tiny_sd3"])
def bare_loop(request, tmp_path_factory):
    """The bare loop's parts and preloaded data on SDXL (pixels control) and on SD3 (cached
    condition latents), half the conditions dropped."""
    from hydra.core.hydra_config import HydraConfig

    from cnexp.bench.bare import build_parts, compose_run, preload
    from cnexp.tinyworld.shapes import ensure_tiny_dataset

    data = ensure_tiny_dataset(tmp_path_factory.mktemp("data"), {"train": 8, "val": 2, "test": 2})
    # compose_run sets Hydra's global config as the bare loop's own process needs; it is put
    # back after this file's tests, so that later tests in this worker find Hydra as it was
    before = HydraConfig.instance().cfg
    try:
        cfg = compose_run([f"base={request.param}", f"data.root={data}", "data.train_size=8",
                           "data.val_size=2", "data.test_size=2", "data.batch_size=4",
                           "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                           "optim.condition_dropout=0.5"])
        torch.manual_seed(cfg.seed)
        parts = build_parts(cfg)
        yield cfg, parts, preload(cfg, parts)
    finally:
        HydraConfig.instance().cfg = before


def test_the_bare_loop_computes_cnexps_loss(bare_loop):
    """The limit is the same step: ControlNetModule.diffusion_loss on the same samples and
    generator gives the bare loop's loss (encoders run on the batch there, preloaded here;
    on SD3 both read the conditions' latents from a cache)."""
    from cnexp.bench.bare import step_loss
    from cnexp.data.dataset import TriplesDataset
    from cnexp.data.layout import open_sources
    from cnexp.encode_cache import FrozenEncoderCache
    from cnexp.module import ControlNetModule

    cfg, parts, data = bare_loop
    cache = FrozenEncoderCache(latents=False, text=False, conditions=True)
    module = ControlNetModule(parts.base, parts.control, cfg.optim, branch=parts.branch,
                              cache=cache)
    assert ("condition_moments" in data) == module.cache.use_conditions == (
        cfg.base.family == "sd3")
    rows = [3, 0, 5, 6]
    dataset = TriplesDataset(open_sources(cfg.data, None)["train"], cfg.data.resolution)
    if module.cache.use_conditions:
        module.cache.precompute(dataset, module._vae_moments, module._text_encoder,
                                torch.device("cpu"), encode_conditions=module._condition_moments)
    items = [dataset[i] for i in rows]
    batch = {"image": torch.stack([item["image"] for item in items]), "index": rows,
             "condition": torch.stack([item["condition"] for item in items]),
             "caption": [item["caption"] for item in items]}
    kept = {k: v.clone() for k, v in parts.control.state_dict().items()}
    torch.manual_seed(0)  # non-zero outputs everywhere, so that a wrong control input shows
    with torch.no_grad():
        for weight in parts.control.parameters():
            weight.normal_(0, 0.3)
        ours = step_loss(cfg, parts, data, torch.tensor(rows), torch.Generator().manual_seed(11))
        theirs = module.diffusion_loss(batch, torch.Generator().manual_seed(11))
        key = "condition_moments" if "condition_moments" in data else "conditions"
        wrong = step_loss(cfg, parts, {**data, key: data[key].roll(1, 0)}, torch.tensor(rows),
                          torch.Generator().manual_seed(11))  # each row another's condition
    parts.control.load_state_dict(kept)  # the next test trains from the fixture's weights
    assert math.isfinite(ours.item()) and ours.item() > 0
    assert torch.allclose(ours, theirs, rtol=1e-4), (ours.item(), theirs.item())
    assert not torch.allclose(ours, wrong, rtol=1e-4), (ours.item(), wrong.item())


def test_a_round_of_the_bare_loop_trains_the_control_net(bare_loop):
    from cnexp.bench.bare import train

    cfg, parts, data = bare_loop
    before = [p.detach().clone() for p in parts.control.parameters() if p.requires_grad]
    losses = train(cfg, parts, data, steps=2)
    after = [p for p in parts.control.parameters() if p.requires_grad]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert data["moments"].shape[:2] == (8, 8) and data["text"].shape[0] <= 8
    assert data["empty"].shape[1:] == data["text"].shape[1:]
