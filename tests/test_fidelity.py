import torch

from cnexp.metrics.fidelity import control_fidelity


def test_real_images_follow_their_own_condition_and_not_others(tiny_data):
    batch = tiny_data.eval_batch()
    real = (batch["image"] + 1) / 2
    own = control_fidelity(real, batch["condition"])
    shuffled = control_fidelity(real, batch["condition"].roll(1, dims=0))
    assert own["shape_iou"] > 0.8 and own["edge_f1"] > 0.6, own
    assert shuffled["shape_iou"] < 0.3 and shuffled["edge_f1"] < 0.4, shuffled


def test_blank_image_scores_zero_iou(tiny_data):
    batch = tiny_data.eval_batch()
    blank = torch.full_like(batch["condition"], 0.5)
    assert control_fidelity(blank, batch["condition"]) == {"edge_f1": 0.0, "shape_iou": 0.0}
