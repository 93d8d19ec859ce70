"""Shape-kind accuracy: the semantic half of the tiny world's control fidelity."""
import numpy as np
from scipy import ndimage

from cnexp.metrics.fidelity import foreground_mask, outline_mask
from cnexp.metrics.shape_kind import kind_accuracy, shape_kinds
from cnexp.tinyworld.shapes import Scene, Shape, scene_at

NEXT_KIND = {"circle": "square", "square": "triangle", "triangle": "circle"}


def filled(scene: Scene) -> np.ndarray:
    return ndimage.binary_fill_holes(outline_mask(np.asarray(scene.condition())))


def drawn(scene: Scene) -> np.ndarray:
    return foreground_mask(np.asarray(scene.target()))


def test_the_real_image_draws_every_outlined_kind():
    scenes = [scene_at(2, i) for i in range(60)]
    assert all(kind_accuracy(filled(s), drawn(s)) == 1.0 for s in scenes)
    single = [s for s in scenes if len(s.shapes) == 1]
    assert [shape_kinds(filled(s), drawn(s))[0][0] for s in single] == \
        [s.shapes[0].kind for s in single]


def test_another_kind_in_the_same_place_is_wrong_and_a_blank_sample_draws_nothing():
    scenes = [scene_at(2, i) for i in range(60)]
    swapped = [Scene(s.background, tuple(Shape(NEXT_KIND[x.kind], x.colour, x.cx, x.cy, x.r)
                                         for x in s.shapes)) for s in scenes]
    scores = [kind_accuracy(filled(s), drawn(w)) for s, w in zip(scenes, swapped)]
    assert np.mean(scores) < 0.1  # only outlines that touch (merged) can still agree
    blank = np.zeros((64, 64), bool)
    assert all(kind is None for _, kind in shape_kinds(filled(scenes[0]), blank))
    assert kind_accuracy(filled(scenes[0]), blank) == 0.0
