"""Labelled image folders: both label formats, folder and zip, errors, caching, the CelebA-HQ data."""

import zipfile

import numpy as np
import pytest
from PIL import Image

from cfedit.data import DataError, ImageFolderDataset, dataset_for_graph, heldout_split, load_labels
from cfedit.data.barmnist import BarMNIST
from cfedit.data.folder import folder_paths, read_label_table
from cfedit.causal.graph_file import graph_from_dict

FACES = {
    "name": "faces",
    "variables": {
        "age": {"values": ["young", "old"], "column": "Young", "codes": {"young": 1, "old": 0}},
        "gender": {"values": ["female", "male"], "column": "Male", "codes": {"female": 0, "male": 1}},
        "gray_hair": {"values": ["no", "yes"], "column": "Gray_Hair", "codes": {"no": 0, "yes": 1}},
    },
    "edges": ["age -> gray_hair"],
    "image": {"channels": 3, "size": 16},
}
N = 12
ATTRS = ["Young", "Male", "Gray_Hair", "Smiling"]


@pytest.fixture()
def faces():
    return graph_from_dict(FACES, "faces.yaml")


@pytest.fixture()
def folder(tmp_path):
    """N random 16x16 PNGs with 0/1 attributes, as CSV, CelebA text file, folder and zip."""
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (N, 16, 16, 3), dtype=np.uint8)
    attrs = rng.integers(0, 2, (N, len(ATTRS)))
    d = tmp_path / "faces"
    (d / "images").mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / "faces.zip", "w") as z:
        for i in range(N):
            Image.fromarray(pix[i]).save(d / "images" / f"{i}.png")
            z.write(d / "images" / f"{i}.png", f"imgs/{i}.png")
    rows = [f"{i}.png," + ",".join(map(str, a)) for i, a in enumerate(attrs)]
    (d / "labels.csv").write_text("image_id," + ",".join(ATTRS) + "\n" + "\n".join(rows) + "\n")
    lines = [str(N), " ".join(ATTRS)] + [f"{i}.png  " + " ".join("1" if v else "-1" for v in a)
                                         for i, a in enumerate(attrs)]
    (tmp_path / "anno.txt").write_text("\n".join(lines) + "\n")
    # expected value indices in graph.names order (age, gender, gray_hair); Young=1 means young (0)
    expected = np.stack([1 - attrs[:, 0], attrs[:, 1], attrs[:, 2]], axis=1)
    return d, tmp_path / "faces.zip", tmp_path / "anno.txt", pix.transpose(0, 3, 1, 2), expected


def test_csv_and_celeba_formats_agree(faces, folder):
    d, _, anno, _, expected = folder
    assert np.array_equal(load_labels(faces, d / "labels.csv"), expected)
    assert np.array_equal(load_labels(faces, anno), expected)
    t = read_label_table(anno)
    assert t.kind == "celeba" and set(t.columns["Young"]) <= {"0", "1"}


def test_folder_and_zip(faces, folder):
    d, zp, anno, pix, expected = folder
    a = ImageFolderDataset(faces, d / "images", d / "labels.csv")
    b = ImageFolderDataset(faces, zp, anno)
    assert a.images.shape == (N, 3, 16, 16) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, pix) and np.array_equal(b.images, pix)
    assert np.array_equal(a.factors, expected) and np.array_equal(b.factors, expected)
    x, y = a[2]
    assert x.shape == (3, 16, 16) and float(x.max()) <= 1.0 and y.tolist() == expected[2].tolist()
    assert np.isclose(a.pv().sum(), 1.0) and a.pv().shape == faces.shape
    sub = ImageFolderDataset(faces, zp, d / "labels.csv", indices=[3, 5], size=8)
    assert sub.images.shape == (2, 3, 8, 8) and np.array_equal(sub.factors, expected[[3, 5]])
    assert sub.ids == ["3.png", "5.png"]


def test_decoded_images_are_cached(faces, folder, tmp_path):
    d, zp, anno, pix, _ = folder
    a = ImageFolderDataset(faces, zp, anno, disk_cache=True, cache_dir=tmp_path / "cache")
    b = ImageFolderDataset(faces, zp, anno, disk_cache=True, cache_dir=tmp_path / "cache")
    assert b.images is a.images  # in-process
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_missing_column_is_reported(faces, folder, tmp_path):
    d, *_ = folder
    p = tmp_path / "nomale.csv"
    p.write_text("image_id,Young,Gray_Hair\n0.png,1,0\n")
    with pytest.raises(DataError, match=r"column\(s\) Male needed by graph 'faces'"):
        load_labels(faces, p)


def test_unknown_codes_are_reported(faces, folder, tmp_path):
    d, *_ = folder
    lines = (d / "labels.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",0", ",7", 1).replace(",1", ",7", 1)
    (d / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_labels(faces, d / "labels.csv")
    msg = str(e.value)
    assert "labels.csv" in msg and "line 4" in msg and "'7'" in msg and "\n" not in msg


def test_missing_images_are_listed(faces, folder):
    d, zp, anno, *_ = folder
    for i in (1, 4, 6, 8, 9):
        (d / "images" / f"{i}.png").unlink()
    with pytest.raises(DataError, match=r"5 image\(s\) .* not found: 1.png, 4.png, 6.png \(and 2 more\)"):
        ImageFolderDataset(faces, d / "images", anno)
    assert len(ImageFolderDataset(faces, d / "images", anno, indices=[0, 2])) == 2


def test_bad_sources(faces, folder, tmp_path):
    d, zp, anno, *_ = folder
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(faces, tmp_path / "nope", anno)
    with pytest.raises(DataError, match="label file not found"):
        ImageFolderDataset(faces, zp, tmp_path / "nope.csv")
    with pytest.raises(DataError, match="out of range"):
        ImageFolderDataset(faces, zp, anno, indices=[0, 99])
    (d / "images" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode"):
        ImageFolderDataset(faces, d / "images", anno, indices=[0])


def test_heldout_split_and_dataset_for_graph(faces, folder, mnist_root):
    tr, te = heldout_split(30000)
    assert len(te) == 3000 and te[0] == 27000 and len(tr) == 27000
    tr, te = heldout_split(N)
    assert len(tr) + len(te) == N and len(te) == 1
    d, zp, anno, pix, expected = folder
    paths = folder_paths(d)
    assert paths == (d / "images", d / "labels.csv")
    ds = dataset_for_graph(faces, "train", data=d)
    assert np.array_equal(ds.factors, expected[:-1])
    ds = dataset_for_graph(faces, "test", data=d / "labels.csv")
    assert np.array_equal(ds.images, pix[-1:])
    bm = dataset_for_graph(BarMNIST("backdoor", "test", 5, root=mnist_root).graph, "test", n=100,
                           root=mnist_root)
    assert isinstance(bm, BarMNIST) and len(bm) == 100 and bm.split == "test"
    with pytest.raises(DataError, match="no 'data:'"):
        dataset_for_graph(faces)


def test_real_celebahq(celebahq):
    g = graph_from_dict(dict(FACES, image={"channels": 3, "size": 64}), "celeba.yaml")
    from_txt = load_labels(g, celebahq / "CelebAMask-HQ-attribute-anno.txt")
    from_csv = load_labels(g, celebahq / "attributes.csv")
    assert from_txt.shape == (30000, 3) and np.array_equal(from_txt, from_csv)
    frac = from_txt.mean(0)
    assert 0.1 < frac[0] < 0.5 and 0.2 < frac[1] < 0.6 and frac[2] < 0.1  # old, male, gray hair
    ds = ImageFolderDataset(g, celebahq / "images_64.zip", celebahq / "attributes.csv",
                            indices=np.arange(0, 30000, 100))
    assert ds.images.shape == (300, 3, 64, 64) and ds.ids[1] == "100.jpg"
    assert np.array_equal(ds.factors, from_txt[::100])
    assert ds.images.std() > 20  # real pictures, not blanks
