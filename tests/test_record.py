"""The run record's schema (cnexp/run/record.py) and the state that makes a resume continue it."""
import json
import math

import pytest

from cnexp.run.log import RunLog
from cnexp.run.record import RECORD_VERSION, RecordError, RunMetrics, read_metrics, write_metrics


def test_write_then_read_round_trips_and_nan_becomes_null(tmp_path):
    metrics = RunMetrics(ablation="baseline", seed=3, steps=10,
                         history=[{"step": 0, "eval/shape_iou": 0.2},
                                  {"step": 10, "eval/shape_iou": float("nan")}],
                         final_loss=math.inf, losses=[{"step": 10, "train/loss": 0.5}],
                         resumed_at=[4])
    path = write_metrics(tmp_path, metrics)
    data = json.loads(path.read_text())  # strict JSON: no NaN/Infinity tokens
    assert data["version"] == RECORD_VERSION and data["final_loss"] is None
    back = read_metrics(path)
    assert back.history[1]["eval/shape_iou"] is None and back.resumed_at == [4]
    assert back.losses == metrics.losses


def test_the_first_layout_without_a_version_still_reads(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"ablation": "lite", "seed": 0, "steps": 5, "history": [], "final": {},
         "eval_seconds": 1.0}))
    assert read_metrics(tmp_path / "metrics.json").version == RECORD_VERSION  # read as current


@pytest.mark.parametrize("data,reason", [
    ({"version": 99}, "record version 99"),
    ({"ablation": 1, "seed": 0, "steps": 1, "history": []}, "field 'ablation' must be str"),
    ({"ablation": "a", "seed": True, "steps": 1, "history": []}, "field 'seed' must be int"),
    ({"ablation": "a", "seed": 0, "steps": 1, "history": {}}, "'history' must be a list"),
    ({"ablation": "a", "seed": 0, "steps": 1, "history": [{"step": 0, "eval/x": "high"}]},
     "history[0] field 'eval/x' is not a number"),
    ({"ablation": "a", "seed": 0, "steps": 1, "history": [], "fit_seconds": "long"},
     "field 'fit_seconds' must be a number"),
])
def test_a_record_of_another_shape_is_refused_naming_the_field(tmp_path, data, reason):
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(RecordError, match=None) as err:
        read_metrics(tmp_path / "metrics.json")
    assert reason in str(err.value) and str(tmp_path / "metrics.json") in str(err.value)


class _Trainer:
    def __init__(self, step, max_steps=100):
        self.global_step, self.max_steps, self.world_size = step, max_steps, 1


def test_run_log_state_continues_losses_time_and_resume_steps(tmp_path):
    history = [{"step": 0, "eval/x": 0.1}, {"step": 4, "eval/x": 0.3}]
    first = RunLog(2, tmp_path / "a.csv", lambda: history)
    first.on_train_start(_Trainer(0), None)
    for step in range(1, 5):
        first.on_train_batch_end(_Trainer(step), None, {"loss": 0.1 * step}, None, step)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint's serialisation
    assert [row["step"] for row in state["losses"]] == [2, 4]
    assert isinstance(state["fit_seconds"], float)

    state["fit_seconds"] = 1000.0  # as if the first part had trained for 1000 s
    resumed = RunLog(2, tmp_path / "b.csv", lambda: history)
    resumed.load_state_dict(state)
    resumed.on_train_start(_Trainer(4), None)
    resumed.on_train_batch_end(_Trainer(6), None, {"loss": 0.6}, None, 6)
    resumed.write_csv()
    assert resumed.resumed_at == [4] and resumed.fit_seconds >= 1000.0  # continues the count
    lines = (tmp_path / "b.csv").read_text().splitlines()
    assert lines[0] == "step,eval/x,train/loss"
    assert lines[1:] == ["0,0.1,", "2,,0.2", "4,0.3,0.4", "6,,0.6"]


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path, tiny_cfg):
    from omegaconf import OmegaConf

    from cnexp.train import build_loggers

    cfg = OmegaConf.merge(tiny_cfg, {"logger": {"mode": "offline"}})
    first, = build_loggers(cfg, tmp_path)
    again, = build_loggers(cfg, tmp_path)  # the resumed process, same run directory
    other, = build_loggers(cfg, tmp_path / "other")
    assert first._wandb_init["id"] == again._wandb_init["id"] != other._wandb_init["id"]
    assert first._wandb_init["resume"] == "allow"
