"""Atomic writes: the target holds the old content or the new, and no temp file is left."""

from __future__ import annotations

import json

import pytest

from sparsedoc import fsio


def test_write_json_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    fsio.write_json(target, {"a": 1, "名": "值"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 1, "名": "值"}
    assert "名" in target.read_text(encoding="utf-8")  # not \\u-escaped
    fsio.write_json(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert [p.name for p in target.parent.iterdir()] == ["summary.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "score.json"
    fsio.write_json(target, {"ok": True})

    def lines():
        yield "first"
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        fsio.write_lines(target, lines())
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["score.json"]
    with pytest.raises(TypeError):  # not serialisable: nothing written either
        fsio.write_json(target, {"x": object()})
    assert json.loads(target.read_text()) == {"ok": True}


def test_replace_dir_swaps_a_folder(tmp_path):
    target, new = tmp_path / "export", tmp_path / "new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    fsio.replace_dir(new, target)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_save_figure_writes_a_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fsio.save_figure(fig, tmp_path / "plot.png", dpi=50)
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
