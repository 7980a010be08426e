"""The scenes data set follows its written spec."""

from __future__ import annotations

import numpy as np

from training.data.scenes import COLOURS, Shape, caption, draw, load_flickr8k, make_scenes


def test_scenes_are_seeded_and_follow_the_spec():
    scenes = make_scenes(300, seed=11)
    again = make_scenes(300, seed=11)
    assert [c for _, c, _ in scenes] == [c for _, c, _ in again]
    assert [c for _, c, _ in make_scenes(20, seed=12)] != [c for _, c, _ in scenes[:20]]
    palette = {(255, 255, 255), *COLOURS.values()}
    counts = set()
    for image, text, shapes in scenes:
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = {tuple(p) for p in np.asarray(image).reshape(-1, 3)}
        assert pixels <= palette  # pure colours on white, no anti-aliasing
        assert {COLOURS[s.colour] for s in shapes} <= pixels
        assert 1 <= len(shapes) <= 3
        counts.add(len(shapes))
        for s in shapes:
            assert 14 <= s.side <= 24 and 0 <= s.x0 <= 64 - s.side and 0 <= s.y0 <= 64 - s.side
        for i, a in enumerate(shapes):
            assert not any(a.overlaps(b, gap=0) for b in shapes[i + 1 :])
        # In pixels: each shape drawn alone paints its own pixels, no two share one,
        # and the scene is exactly their union, every shape fully visible.
        alone = [np.any(np.asarray(draw([s])) != 255, axis=-1) for s in shapes]
        assert sum(m.astype(int) for m in alone).max() == 1
        assert np.array_equal(np.any(np.asarray(image) != 255, axis=-1), np.any(alone, axis=0))
        for s, mask in zip(shapes, alone, strict=True):
            assert mask.sum() > 14 * 14 / 3  # a shape of at least 14 px, never a sliver
            assert (np.asarray(image)[mask] == COLOURS[s.colour]).all()
        assert text == text.lower() and text.replace(" ", "").isalpha()
    assert counts == {1, 2, 3}


def test_caption_grammar():
    red_circle = Shape("circle", "red", 0, 0, 20)  # centre (10, 10)
    blue_square_right = Shape("square", "blue", 40, 5, 20)  # centre (50, 15): dx 40 > dy 5
    blue_square_below = Shape("square", "blue", 4, 40, 20)  # centre (14, 50): dy 40 > dx 4
    green_triangle = Shape("triangle", "green", 20, 40, 16)  # centre (28, 48)
    assert caption([red_circle]) == "a red circle"
    assert caption([blue_square_right, red_circle]) == "a red circle left of a blue square"
    assert caption([blue_square_below, red_circle]) == "a red circle above a blue square"
    equal = Shape("square", "yellow", 20, 20, 20)  # centre (30, 30): dx == dy -> above
    assert caption([equal, red_circle]) == "a red circle above a yellow square"
    assert caption([blue_square_right, green_triangle, red_circle]) == (
        "a red circle a green triangle and a blue square"
    )


def test_flickr8k_style_loader(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.jpg").write_bytes(b"x")
    (tmp_path / "captions.txt").write_text(
        "1.jpg#0\tA dog  runs .\n1.jpg#1\tTwo dogs\nmissing.jpg#0\tgone\nno tab line\n"
    )
    pairs = load_flickr8k(tmp_path / "img", tmp_path / "captions.txt")
    assert pairs == [(tmp_path / "img" / "1.jpg", "a dog runs ."),
                     (tmp_path / "img" / "1.jpg", "two dogs")]  # fmt: skip
