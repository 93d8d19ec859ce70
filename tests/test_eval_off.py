"""eval.enabled=false builds no evaluation model (issue 12, item 3): no CLIP, FID network or
annotator is loaded, so a base without them (offline SD) trains with evaluation off."""
import pytest
from omegaconf import OmegaConf

from cnexp.errors import CnexpError
from cnexp.metrics.callbacks import build_evaluation

BOGUS = {"base": {"clip_model": "/nonexistent/clip"},
         "eval": {"fid_feature": "/nonexistent/feature.pt"},
         "data": {"annotator": "hed", "annotator_path": "/nonexistent/annotators"}}


@pytest.mark.parametrize("part", ["base", "eval", "data"])
def test_with_evaluation_on_each_bogus_model_fails_before_training(tiny_cfg, tiny_data, tmp_path,
                                                                   part):
    cfg = OmegaConf.merge(tiny_cfg, {part: BOGUS[part]})
    with pytest.raises((CnexpError, OSError)):
        build_evaluation(cfg, tiny_data, tmp_path)


def test_with_evaluation_off_none_is_loaded(tiny_cfg, tiny_data, tmp_path):
    cfg = OmegaConf.merge(tiny_cfg, BOGUS, {"eval": {"enabled": False}})
    callback = build_evaluation(cfg, tiny_data, tmp_path)
    assert callback.metrics == []
    assert callback.annotate is None and len(callback.batch["caption"]) == 4
