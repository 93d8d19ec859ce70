"""The sample-metric registry (issue 24, item 2): a metric is one registered module in
cnexp/metrics/; eval.metrics' choices, the evaluation loop and compare's directions come from it,
so a new metric (here a toy one, dropped into a package in a test) is one module, nothing else
edited."""
import importlib
import json

import pytest
from omegaconf import OmegaConf

from cnexp.analysis.compare import compare
from cnexp.analysis.report import heading
from cnexp.analysis.runs import OK, read_run
from cnexp.errors import ConfigError
from cnexp.knobs import MetricName
from cnexp.registry import declared
from cnexp.metrics.fidelity import FIDELITY
from cnexp.metrics.registry import METRICS, described, get_metric, metric_names, selected_metrics
from conftest import TINY, compose_cfg

TOY = '''
from torchmetrics import MeanMetric

from cnexp.metrics.registry import SampleMetric, register


@register
class MeanBrightness(SampleMetric):
    name = "toy_brightness"
    label = "mean brightness"
    needs = ("samples",)
    higher_is_better = False

    def __init__(self):
        self.mean = None

    def prepare(self, device, holds_reference):
        if self.mean is None:  # built once, on the model's device
            self.mean = MeanMetric()
        self.mean.to(device)

    def update(self, samples):
        assert samples.captions is None and samples.prompts is None  # not declared in needs
        self.mean.update(samples.images.mean(dim=(1, 2, 3)))

    def compute(self):
        return float(self.mean.compute())

    def reset(self):
        self.mean.reset()
'''

RUN = ["data.train_size=16", "data.val_size=4", "data.test_size=4", "data.batch_size=4",
       "data.eval_size=2", "trainer.max_steps=2", "sampling.steps=2",
       "eval.prompt_settings=[none,perfect]", "eval.fid=false", "eval.clip_score=false",
       "eval.curve_images=0", "logger.mode=disabled", "logger.csv=false",
       "trainer.enable_progress_bar=false", "export=false"]


def test_the_choices_are_the_declared_metrics_and_compare_reads_their_directions():
    declared = METRICS.declared()
    assert [m.value for m in MetricName] == list(declared) == metric_names()
    assert {"clip_score", "fid"} <= set(declared)
    for name, stem in declared.items():
        cls = get_metric(name)
        assert cls.name == name and cls.__module__ == f"cnexp.metrics.{stem}"
        # what compare reads from source (no import) agrees with the class
        assert described(name) == {"higher_is_better": cls.higher_is_better, "label": cls.label}
    assert described("clip_score_prompt")["higher_is_better"] is True
    assert heading("fid") == "fid: FID (lower is better)"
    for fidelity in FIDELITY.values():  # the fidelity table, read from source as well
        for name in fidelity.metrics:
            assert described(name)["higher_is_better"] is fidelity.higher_is_better


def test_a_misspelt_metric_fails_at_composition_listing_the_choices():
    with pytest.raises(Exception) as err:
        compose_cfg(["eval.metrics=[clip_scor]"])
    message = f"{err.value}\n{err.value.__cause__}"
    assert "Invalid value 'clip_scor', expected one of [clip_score, fid" in message, message
    with pytest.raises(ConfigError, match=r"eval.metrics='clip_scor' is unknown: use one of clip_score, fid"):
        get_metric("clip_scor")


def test_a_metric_runs_when_listed_and_switched_on(tiny_cfg, tiny_data, tmp_path):
    from cnexp.metrics.callbacks import build_evaluation

    def names(**ev):
        cfg = OmegaConf.merge(tiny_cfg, {"eval": ev})
        return [m.name for m in selected_metrics(cfg)]

    assert names() == ["clip_score", "fid"]  # null: every registered metric
    assert names(metrics=["fid"]) == ["fid"]
    assert names(metrics=["clip_score", "fid"], fid=False) == ["clip_score"]  # its switch too
    assert names(metrics=[]) == []
    callback = build_evaluation(OmegaConf.merge(tiny_cfg, {"eval": {"metrics": ["fid"]}}),
                                tiny_data, tmp_path)
    assert [m.name for m in callback.metrics] == ["fid"]  # CLIP neither loaded nor scored


@pytest.mark.skipif(not (TINY / "model_index.json").exists(),
                    reason="needs the tiny world bundle at assets/tinyworld")
def test_a_metric_module_dropped_in_registers_runs_in_training_and_reaches_compare(
        tmp_path, toy_package):
    from cnexp.train import train

    package = toy_package("toy_metrics", TOY)
    assert declared(package) == {"toy_brightness": "toy"}  # what knobs.py makes the choices
    try:
        importlib.import_module("toy_metrics.toy")
        assert "toy_brightness" in metric_names()
        fid_only = compose_cfg(["eval.metrics=[fid]"])
        assert [m.name for m in selected_metrics(fid_only)] == ["fid"]  # a list leaves it out
        run = tmp_path / "run"
        train(compose_cfg([f"data.root={tmp_path / 'data'}", *RUN], out_dir=run))
        final = json.loads((run / "metrics.json").read_text())["final"]
        for setting in ("none", "perfect"):
            assert 0 < final[f"eval/{setting}/toy_brightness"] < 1
        assert final["eval/toy_brightness"] == final["eval/perfect/toy_brightness"]
        assert not any("clip_score" in key or "fid" in key for key in final)  # switched off
        record = read_run(run)
        assert record.status == OK, record.error
        table = compare([record], tmp_path / "compare", "toy", figures=False)
        assert set(table["toy_brightness"]["baseline"]) == {"none", "perfect"}
        report = (tmp_path / "compare" / "report.md").read_text()
        assert "## toy_brightness: mean brightness (lower is better)" in report
    finally:
        METRICS.unregister("toy_brightness")  # the other tests see the built-in metrics only
    with pytest.raises(ConfigError, match="eval.metrics='toy_brightness' is unknown"):
        get_metric("toy_brightness")
