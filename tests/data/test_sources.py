"""cfedit.data.sources: the data's fingerprint follows its content, not its place."""

import shutil

from cfedit.causal.graph_file import load_graph
from cfedit.data.sources import data_fingerprint


def test_fingerprint_depends_on_content_not_on_the_folder(tmp_path):
    g = load_graph("backdoor")
    a = tmp_path / "a"
    a.mkdir()
    (a / "labels.csv").write_text("image_id,digit,color,bar\n0.png,3,red,no\n")
    (a / "0.png").write_bytes(b"x" * 10)
    shutil.copytree(a, tmp_path / "b")
    assert data_fingerprint(g, a) == data_fingerprint(g, tmp_path / "b")  # same files elsewhere: one reader
    (tmp_path / "b" / "labels.csv").write_text("image_id,digit,color,bar\n0.png,3,green,no\n")
    assert data_fingerprint(g, a) != data_fingerprint(g, tmp_path / "b")
    before = data_fingerprint(g, a)
    (a / "1.png").write_bytes(b"y")  # an image added
    assert data_fingerprint(g, a) != before
