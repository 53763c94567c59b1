"""Issue 17.9: a 1x1 image's overlay has a sane size, Unicode file names are kept (only what the file
system forbids is escaped), CJK/emoji class names give one notice, not a warning per glyph."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from camlens import viz


def test_tiny_and_thin_images_give_sane_overlays(tmp_path):
    for shape, size in (((1, 1, 3), (320, 470)), ((48, 64, 3), (320, 390)), ((2000, 1, 3), (2, 4156))):
        fig = viz.overlay_figure(np.zeros(shape, np.uint8), np.eye(2), "t")
        viz.save_figure(fig, tmp_path / "o.png")
        with Image.open(tmp_path / "o.png") as im:
            w, h = im.size
        assert abs(w - size[0]) <= 1 and abs(h - size[1]) <= 2, (shape, im.size)


def test_unicode_names_are_kept():
    from camlens.cli.common import output_stems

    assert viz.safe_name("chat_été") == "chat_été"
    assert viz.safe_name("猫の写真") == "猫の写真"
    assert viz.safe_name("🐱 cat") == "🐱_cat"
    assert viz.safe_name('a/b\\c:d*e?f|g<h>"i') == "a_b_c_d_e_f_g_h_i"
    assert viz.safe_name("../../etc/passwd") == "etc_passwd"
    assert viz.safe_name("tab\there\x00nul\u200bzw") == "tab_here_nul_zw"
    assert viz.safe_name("e\u0301t\u00e9") == "\u00e9t\u00e9"  # NFC: one code point per letter
    assert len(viz.safe_name("猫" * 200).encode()) <= 200
    assert output_stems(["photos/chat_été.jpg", "写真/猫.png"]) == ["chat_été", "猫"]


def test_missing_glyphs_are_said_once(tmp_path, monkeypatch):
    monkeypatch.setattr(viz.png, "_NOTICE_GIVEN", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2):
            fig = viz.overlay_figure(np.zeros((8, 8, 3), np.uint8), np.eye(2), "Grad-CAM · 猫 🐱 (70%)")
            viz.save_figure(fig, tmp_path / f"{i}.png")
    ours = [w for w in caught if "not in the installed fonts" in str(w.message)]
    glyphs = [w for w in caught if "missing from font" in str(w.message)]
    if viz.png._FALLBACKS:  # a CJK font is installed: it is used, nothing to say
        pytest.skip("a CJK fallback font is installed here: no missing glyph to report")
    assert len(ours) == 1 and "猫" in str(ours[0].message) and not glyphs


def test_drawing_a_missing_glyph_leaves_the_process_warning_filters_as_they_were(tmp_path, monkeypatch):
    """The glyph warnings are silenced only inside camlens' own draws, never process-wide."""
    monkeypatch.setattr(viz.png, "_NOTICE_GIVEN", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-process notice
        before = list(warnings.filters)
        fig = viz.overlay_figure(np.zeros((8, 8, 3), np.uint8), np.eye(2), "Grad-CAM · 猫")
        viz.save_figure(fig, tmp_path / "a.png")
        viz.figure_png(fig)
        after = list(warnings.filters)
    assert after == before
