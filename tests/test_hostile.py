"""Hostile and broken input: one clear line, bounded time and memory, never a wrong answer.

Each section is one class of problem; add a case to its table or a test
next to it. Conventions: a user error exits 2 and prints exactly one stderr line
``cfedit: error: ...`` naming the file, line or key (:func:`one_line`); anything else that escapes
is a bug (exit 1, one line, a request to report it). Boundedness is shown with limits refused
before any work, never with wall-clock timings.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cfedit.cli import app, handles_errors
from cfedit.errors import (BoundsError, CfeditError, CheckpointError, DataError, DestinationError, GraphError,
                           ImageReadError, QueryError, UsageFailure)

REPO = Path(__file__).resolve().parents[1]
FRONTDOOR_CKPT = REPO / "checkpoints" / "frontdoor.safetensors"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, code: int, *needles: str) -> str:
    """The single stderr line of a failed command, checked for its exit code and contents."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cfedit: error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def finishes(fn, seconds: float = 60.0):
    """``fn()``'s result (or exception), failing instead of hanging when ``fn`` blocks (a regression
    that opens a FIFO would wait forever)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked"
    if "error" in box:
        raise box["error"]
    return box["value"]


def write(tmp_path: Path, text: str | bytes, name: str = "g.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (what a decompression bomb looks like to a
    reader that trusts headers)."""
    data = bytearray(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ==============================================================================================
# The hierarchy: one base class, the old import paths, one place that maps it to exit codes
# ==============================================================================================

def test_every_user_error_is_a_cfedit_error_at_its_old_import_path():
    from cfedit.causal.bounds import BoundsError as B
    from cfedit.checkpoint import CheckpointError as C
    from cfedit.cli import UsageFailure as U
    from cfedit.data import DataError as D
    from cfedit.causal.graph import GraphError as G
    from cfedit.imageio import ImageReadError as I
    from cfedit.causal.query import QueryError as Q

    assert (B, C, U, D, G, I, Q) == (BoundsError, CheckpointError, UsageFailure, DataError, GraphError,
                                     ImageReadError, QueryError)
    for cls in (B, C, U, D, G, I, Q, DestinationError):
        assert issubclass(cls, CfeditError)
    for cls in (B, C, D, G, I, Q, DestinationError):
        assert issubclass(cls, ValueError)  # code that catches ValueError keeps working


def _app_raising(error: BaseException) -> typer.Typer:
    demo = typer.Typer()

    @demo.command()
    @handles_errors
    def run() -> None:
        raise error

    return demo


@pytest.mark.parametrize("error,code,needles", [
    (GraphError("g.yaml:3: bad key"), 2, ["g.yaml:3: bad key"]),
    (DataError("labels.csv:7: unknown value\nsecond line"), 2, ["labels.csv:7: unknown value second line"]),
    (UsageFailure("--set: give one"), 2, ["--set: give one"]),
    (OSError(errno.ENOSPC, "No space left on device", "/full/out.png"), 2, ["/full/out.png: No space left"]),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), 2, ["/ro/x: Read-only file system"]),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "afile/sub"), 2, ["afile/sub: Not a directory"]),
    (OSError(errno.EIO, "Input/output error", "/disk/x"), 1, ["/disk/x: Input/output error"]),
    (KeyError("features"), 1, ["KeyError: 'features'", "a bug in cfedit", "CFEDIT_DEBUG=1"]),
    (RuntimeError("Error(s) in loading state_dict for CVAE:\n" + "\tsize mismatch for x. " * 80), 1,
     ["RuntimeError: Error(s) in loading state_dict for CVAE:", "a bug in cfedit"]),
    (ValueError("a\x1b[31m terminal escape"), 1, ["\\x1b[31m"]),
])
def test_handles_errors_maps_each_kind_to_one_line_and_its_exit_code(error, code, needles):
    line = one_line(runner.invoke(_app_raising(error), []), code, *needles)
    assert len(line) < 400 and "\x1b" not in line


def test_a_bug_line_never_repeats_advice_to_load_unsafely():
    advice = pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set "
                                    "to `False` will likely succeed, but it can result in arbitrary code execution.")
    line = one_line(runner.invoke(_app_raising(advice), []), 1, "UnpicklingError: Weights only load failed")
    assert "weights_only" not in line


# ==============================================================================================
# Usage errors: Typer's framed box becomes one line, exit 2
# ==============================================================================================

@pytest.mark.parametrize("args,needles", [
    (["edit", "x.png", "--set", "color=red", "--samples", "0"], ["'--samples'", "cfedit edit --help"]),
    (["edit", "x.png", "--set", "color=red", "--seed", "abc"], ["'--seed'"]),
    (["fit", "--graph", "backdoor", "--epochs", "0"], ["'--epochs'", "cfedit fit --help"]),
    (["bounds", "-g", "backdoor", "--seed", "-1"], ["'--seed'"]),
    (["data", "barmnist", "backdoor", "--out", "x", "--n", "0"], ["'--n'", "cfedit data barmnist --help"]),
    (["data", "barmnist", "backdoor", "--out", "x", "--seed", "-1"], ["'--seed'"]),
    (["bounds", "--frobnicate"], ["--frobnicate"]),
    (["bounds"], ["'--graph'"]),
    (["graph", "show"], ["Missing argument"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_usage_errors_are_one_line_exit_2(args, needles):
    one_line(cli(*args), 2, *needles)


# ==============================================================================================
# Graph files: every section validated at load, with file, line and key
# ==============================================================================================

GRAPH_CASES = [
    # (file text, what the message says, line)
    ("variables:\n  a: [x, y]\nimage: {channels: 3.7, size: 28}\n", "'image' channels must be a whole number, not 3.7", 3),
    ("variables:\n  a: [x, y]\nimage: {channels: 3, size: 28.5}\n", "'image' size must be a whole number", 3),
    ("variables:\n  a: [x, y]\nimage: {channels: 3, size: '28'}\n", "'image' size must be a whole number", 3),
    ("variables:\n  a: [x, y]\nimage: {channels: true}\n", "'image' channels must be a whole number", 3),
    ("variables:\n  a: [x, y]\nimage: {channels: 3, sise: 28}\n", "unknown key 'sise'", 3),
    ("variables:\n  a:\n    values: [x, y]\n    codes: {x: [1], y: 0}\n", "the code of 'x' must be a word or a number", 4),
    ("variables:\n  a:\n    values: [x, y]\n    codes: {x: 1.5, y: 0}\n", "not the fraction 1.5", 4),
    ("variables:\n  a:\n    values: [x, y]\n    codes: {x: ~, y: 0}\n", "the code of 'x' must be a word or a number, "
     "not nothing", 4),
    ("variables:\n  a:\n    values: [x, y]\n    codes: {x: ' 1', y: 0}\n", "starts or ends with a space", 4),
    ("variables:\n  a:\n    values: [x, y]\n    column: [A]\n", "column must be a word or a number", 4),
    ("variables:\n  a: [x, ~]\n", "value 2 must be a word or a number, not nothing", 2),
    ("variables:\n  a: [x, y]\ndata: {foldr: images}\n", "'data': unknown key 'foldr'", 3),
    ("variables:\n  a: [x, y]\ndata: {barmnist: backdoor, folder: here}\n", "exactly one source", 3),
    ("variables:\n  a: [x, y]\ndata:\n  images: here.zip\n", "images go with labels", 4),
    ("variables:\n  a: [x, y]\ndata: {barmnist: ../x}\n", "barmnist must name a setting", 3),
    ("variables:\n  a: [x, y]\ndata: [here]\n", "'data' must be a mapping", 3),
    ("variables:\n  a: [x, y]\nfit:\n  epochs: 2\n  latnet: 8\n", "'fit' (mechanism cvae): unknown key 'latnet'", 5),
    ("variables:\n  a: [x, y]\nfit: {mechanism: masked, latent: 8}\n", "(mechanism masked): unknown key 'latent'", 3),
    ("variables:\n  a: [x, y]\nfit: {mechanism: gan}\n", "'fit' mechanism must be one of cvae, masked", 3),
    ("variables:\n  a: [x, y]\nfit: {epochs: 0}\n", "'fit' epochs must be a whole number of at least 1, not 0", 3),
    ("variables:\n  a: [x, y]\nfit: {lr: -0.1}\n", "'fit' lr must be a number of at least 0", 3),
    ("variables:\n  a: [x, y]\nfit: {swap_p: 2}\n", "'fit' swap_p must be a number from 0 to 1", 3),
    ("variables:\n  a: [x, y]\nfit: {residual: 1}\n", "'fit' residual must be true or false", 3),
    ("variables:\n  a: [x, y]\nreader:\n  flip: true\n  mirrror: true\n", "'reader': unknown key 'mirrror'", 5),
    ("variables:\n  a: [x, y]\nreader: {epochs: 2.5}\n", "'reader' epochs must be a whole number", 3),
    ("name: ../../ESCAPED\nvariables:\n  a: [x, y]\n", "graph name '../../ESCAPED' must be", 1),
    ("name: .hidden\nvariables:\n  a: [x, y]\n", "graph name '.hidden' must be", 1),
    ("name: a/b\nvariables:\n  a: [x, y]\n", "graph name 'a/b' must be", 1),
    ("name: [a]\nvariables:\n  a: [x, y]\n", "'name' must be a word", 1),
    ("variables:\n  a: [x, y]\nqueries:\n  ../q: P(a=x)\n", "query name '../q'", 4),
    ("variables:\n  a: [x, y]\nqueries:\n  q: [P(a=x)]\n", "query 'q' must be text", 4),
    ("description: [a, b]\nvariables:\n  a: [x, y]\n", "'description' must be text", 1),
    ('description: "red \\e[31m"\nvariables:\n  a: [x, y]\n', "control character", 1),
]


@pytest.mark.parametrize("text,message,line", GRAPH_CASES)
def test_bad_graph_sections_are_one_line_with_file_line_and_key(tmp_path, text, message, line):
    p = write(tmp_path, text)
    one_line(cli("graph", "show", p), 2, f"{p}:{line}: ", message)


YAML_CASES = [
    # hostile YAML: tags that would construct objects, aliases that explode, odd keys and nesting
    ("name: x\nvariables:\n  a: !!python/object/apply:os.system [echo pwned]\n",
     "YAML tag !!python/object/apply:os.system is not allowed", 3),
    ("variables:\n  a: !!python/name:os.system\n", "YAML tag !!python/name:os.system is not allowed", 2),
    ("variables:\n  !!python/name:os.system x: [a, b]\n", "a key must be a plain word", 2),
    ("variables:\n  a: !!binary aGVsbG8=\n", "YAML tag !!binary", 2),
    ("variables:\n  a: !!set {x, y}\n", "YAML tag !!set", 2),
    ("variables:\n  a: !mine [x, y]\n", "YAML tag !mine", 2),
    ("variables:\n  a: &b {values: [x, y]}\n  c:\n    <<: *b\n", "a key must be a plain word, not !!merge", 4),
    ("variables:\n  ? [a, b]\n  : [x, y]\n", "a key must be a plain word, not a list or mapping", 2),
    ("r: &r [*r]\nvariables: {a: [x, y]}\n", "a YAML alias refers to the node that contains it", 1),
    ("variables:\n  a: [x, y]\n  a: [x, y]\n", "duplicate key 'a'", 3),
    ("x: " + "[" * 40 + "]" * 40 + "\nvariables: {a: [x, y]}\n", "nested deeper than 32 levels", 1),
    ("x: " + "[" * 5000 + "\n", "", None),  # the parser's own depth limit (libyaml: "not valid YAML")
    ("variables:\n  a: [x, 2024-13-45]\n", "cannot read '2024-13-45'", 2),
]


@pytest.mark.parametrize("text,message,line", YAML_CASES)
def test_hostile_yaml_is_refused_in_one_line(tmp_path, text, message, line):
    p = write(tmp_path, text)
    one_line(cli("graph", "show", p), 2, f"{p}:{line}: " if line else f"{p}", message)


def test_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    """'Billion laughs': nine levels of ten aliases each would be 10^9 values."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    p = write(tmp_path, "\n".join(lines) + "\nvariables: {v: *l8}\n")
    one_line(cli("graph", "show", p), 2, f"{p}: ", "YAML aliases expand the file by", "over the limit of 10,000")


def test_aliases_within_the_limit_still_work(tmp_path):
    from cfedit.causal.graph_file import load_graph

    p = write(tmp_path, "variables:\n  a: &v [no, yes]\n  b: *v\nedges: [a -> b]\n")
    assert load_graph(p).shape == (2, 2)


def test_non_utf8_graph_names_file_line_and_byte(tmp_path):
    p = write(tmp_path, b"name: x\ndescription: caf\xe9\nvariables:\n  a: [x, y]\n")
    one_line(cli("graph", "show", p), 2, f"{p}:2: not UTF-8 text (byte 0xe9")


def test_markup_in_a_description_is_printed_as_written(tmp_path):
    p = write(tmp_path, 'description: "[/red] not [bold]markup"\nvariables:\n  a: [x, y]\n')
    r = cli("graph", "show", p)
    assert r.exit_code == 0, r.output
    assert "[/red] not [bold]markup" in r.stdout


def test_markup_in_a_data_path_is_printed_as_written(tmp_path):
    (tmp_path / "odd[").mkdir()
    labels = tmp_path / "odd[" / "red]name.csv"  # the path holds "[/red]"
    labels.write_text("digit,color,bar\n3,red,yes\n3,green,no\n7,red,no\n")
    r = cli("bounds", "-g", "backdoor", "--data", labels, "-q", "P(bar_{color=red}=yes)")
    assert r.exit_code == 0, r.output
    assert "odd[/red]name.csv" in "".join(r.stdout.split())  # (the title may wrap)


def test_labels_and_codes_are_the_words_as_written(tmp_path):
    """YAML 1.1 reads off/on as booleans and 0x10 as 16; a label or code is what the user wrote."""
    from cfedit.causal.graph_file import load_graph

    p = write(tmp_path, "variables:\n  a: [off, on]\n  b: {values: [x, y], codes: {x: 0x10, y: '010'}}\n")
    g = load_graph(p)
    assert g["a"].values == ("off", "on")
    assert g["b"].codes == (("x", "0x10"), ("y", "010")) and g["b"].code_to_index("0x10") == 0


def test_a_name_made_from_the_file_name_is_a_valid_name(tmp_path):
    from cfedit.causal.graph_file import load_graph

    assert load_graph(write(tmp_path, "variables: {a: [x, y]}\n", "my graph (v2).yaml")).name == "my_graph_v2_"
    assert load_graph(write(tmp_path, "variables: {a: [x, y]}\n", "...yaml")).name == "graph"


def test_fit_never_builds_a_path_from_a_bad_graph_name(tmp_path):
    p = write(tmp_path, "name: ../../ESCAPED\nvariables:\n  a: [x, y]\n")
    one_line(cli("fit", "--graph", p, "--device", "cpu"), 2, f"{p}:1: graph name")
    assert not (tmp_path.parent.parent / "ESCAPED-canonical.safetensors").exists()


def test_domain_cap_and_file_size_cap_are_refused_before_building(tmp_path):
    from cfedit.causal.graph import MAX_DOMAIN
    from cfedit.causal.graph_file import MAX_GRAPH_BYTES, load_graph

    values = ", ".join(f"v{i}" for i in range(MAX_DOMAIN))
    assert load_graph(write(tmp_path, f"variables:\n  a: [{values}]\n")).shape == (MAX_DOMAIN,)
    p = write(tmp_path, f"variables:\n  a: [{values}, one_more]\n")
    one_line(cli("graph", "show", p), 2, f"{p}:2: ", f"has {MAX_DOMAIN + 1:,} values, over the limit")
    p = write(tmp_path, "variables: {a: [x, y]}\n#" + "x" * MAX_GRAPH_BYTES)
    one_line(cli("graph", "show", p), 2, f"{p}: graph file of {p.stat().st_size:,} bytes is over the limit of 1.0 MiB")


# ==============================================================================================
# Files that are not regular files, or too large: refused before a byte is read
# ==============================================================================================

@pytest.fixture()
def fifo(tmp_path) -> Path:
    p = tmp_path / "pipe.png"
    os.mkfifo(p)
    return p


def test_a_fifo_is_never_opened_as_graph_image_checkpoint_or_labels(fifo):
    from cfedit.checkpoint import load_checkpoint, read_checkpoint_graph
    from cfedit.data import load_labels
    from cfedit.causal.graph_file import load_graph
    from cfedit.imageio import read_image, read_original

    cases = [(GraphError, lambda: load_graph(fifo)), (ImageReadError, lambda: read_image(fifo, 28, 3)),
             (ImageReadError, lambda: read_original(fifo, 3)), (CheckpointError, lambda: load_checkpoint(fifo)),
             (CheckpointError, lambda: read_checkpoint_graph(fifo)),
             (DataError, lambda: load_labels(load_graph("backdoor"), fifo))]
    for error, call in cases:
        with pytest.raises(error, match=f"{fifo}: is a pipe, not a regular file"):
            finishes(call)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero here")
def test_devices_and_folders_are_not_read(tmp_path):
    from cfedit.checkpoint import load_checkpoint
    from cfedit.imageio import read_image

    with pytest.raises(ImageReadError, match="is a character device"):
        finishes(lambda: read_image("/dev/zero", 28, 3))
    with pytest.raises(CheckpointError, match="is a character device"):
        finishes(lambda: load_checkpoint("/dev/zero"))
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path, 28, 3)


def test_edit_and_bounds_refuse_a_fifo_in_one_line(fifo):
    one_line(finishes(lambda: cli("edit", REPO / "examples" / "digit2_red_nobar.png", "--set", "digit=3", "-c", fifo,
                                  "--out", fifo.parent / "o")), 2, f"{fifo}: is a pipe")
    one_line(finishes(lambda: cli("bounds", "-g", "backdoor", "--data", fifo)), 2, f"{fifo}: is a pipe")


def test_oversized_files_are_refused_from_their_size(tmp_path, monkeypatch):
    import cfedit.checkpoint as ck
    import cfedit.imageio as imageio

    p = tmp_path / "big.png"
    p.write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    monkeypatch.setattr(imageio, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(ImageReadError, match=r"big.png: image of \d+ bytes is over the limit of 10 bytes"):
        imageio.read_image(p, 28, 3)
    monkeypatch.setattr(ck, "MAX_CHECKPOINT_BYTES", 1000)
    with pytest.raises(CheckpointError, match=f"checkpoint of {FRONTDOOR_CKPT.stat().st_size:,} bytes is over the limit"):
        ck.load_checkpoint(FRONTDOOR_CKPT)


def test_zip_members_above_the_image_limit_are_not_unpacked(tmp_path, monkeypatch):
    import zipfile

    import cfedit.data.folder as folder
    from cfedit.causal.graph_file import graph_from_dict

    d = tmp_path / "d"
    d.mkdir()
    with zipfile.ZipFile(d / "images.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", bytes(10_000))  # compresses to almost nothing
    (d / "labels.csv").write_text("image_id,v\na.png,x\n")
    monkeypatch.setattr(folder, "MAX_IMAGE_BYTES", 1000)
    g = graph_from_dict({"name": "z", "variables": {"v": ["x", "y"]}, "image": {"channels": 1, "size": 8}})
    with pytest.raises(DataError, match=r"a.png: 10,000 bytes unpacked, over the image limit of 1,000"):
        folder.ImageFolderDataset(g, d / "images.zip", d / "labels.csv")


# ==============================================================================================
# Images: 16-bit, decompression bombs, the --keep-size working size
# ==============================================================================================

def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    from cfedit.imageio import read_image, read_original

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(ramp).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I;16")
    full = read_original(p, 1)[0]
    assert np.array_equal(full, ((ramp.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    assert len(np.unique(full)) == 256  # a ramp, not black and white
    x, note = read_image(p, 28, 3)
    assert "mode I;16" in note and 0 < np.median(x) < 255 and len(np.unique(x)) > 100
    mid = tmp_path / "mid.png"
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(mid)
    assert read_original(mid, 1).max() == 128


@pytest.mark.parametrize("side,message", [
    (12000, "12000x12000 is 144,000,000 pixels, over the limit of 67,108,864"),  # Pillow would only warn
    (20000, "over the limit of 67,108,864 pixels for an image (a decompression bomb?)"),  # Pillow refuses
])
def test_decompression_bombs_are_refused_from_the_header_without_a_warning(tmp_path, recwarn, side, message):
    from cfedit.imageio import read_image

    p = tmp_path / "bomb.png"
    p.write_bytes(png_declaring(side, side))  # 0.1 KB on disk
    with pytest.raises(ImageReadError) as e:
        read_image(p, 28, 3)
    assert f"bomb.png: {message}" in str(e.value)
    assert not [w for w in recwarn if "DecompressionBomb" in w.category.__name__]


def test_keep_size_caps_the_working_size(tmp_path):
    from cfedit.imageio import KEEP_SIZE_MAX_PIXELS, read_image, read_original

    p = tmp_path / "wide.png"
    p.write_bytes(png_declaring(12000, 12000))
    with pytest.raises(ImageReadError, match=f"over the limit of {KEEP_SIZE_MAX_PIXELS:,} for editing at its own size"):
        read_original(p, 3)
    q = tmp_path / "ok.png"
    q.write_bytes(png_declaring(5000, 4000))  # fine at model size, too large at its own size
    with pytest.raises(ImageReadError, match="--keep-size"):
        read_original(q, 3)
    with pytest.raises(ImageReadError, match="cannot decode"):  # (its pixel data is a stub)
        read_image(q, 28, 3)


# ==============================================================================================
# Checkpoints: tampered, truncated, foreign; configs checked against tensor shapes first
# ==============================================================================================

def _tampered(tmp_path: Path, name: str, tensors=None, **meta_changes) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load, save

    t = load(FRONTDOOR_CKPT.read_bytes()) if tensors is None else tensors
    with safe_open(str(FRONTDOOR_CKPT), "pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    p = tmp_path / name
    p.write_bytes(save(t, metadata=meta))
    return p


def _config(**changes) -> str:
    from safetensors import safe_open

    with safe_open(str(FRONTDOOR_CKPT), "pt") as f:
        config = json.loads(f.metadata()["config"])
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    return json.dumps(config)


def test_tampered_checkpoint_sections_are_one_line_checkpoint_errors(tmp_path):
    from safetensors.torch import load

    from cfedit.checkpoint import load_checkpoint

    no_features = load_checkpoint(_tampered(tmp_path, "a.safetensors", config=_config(features=None)))
    with pytest.raises(CheckpointError, match=r"a.safetensors: damaged checkpoint: no config section 'features'"):
        no_features.config["features"]
    tensors = {k: v for k, v in load(FRONTDOOR_CKPT.read_bytes()).items() if k != "pv"}
    no_pv = load_checkpoint(_tampered(tmp_path, "b.safetensors", tensors))
    with pytest.raises(CheckpointError, match=r"b.safetensors: damaged checkpoint: no tensor 'pv'"):
        no_pv.tensors["pv"]
    for name, changes, message in [
        ("c", {"config": "[1, 2]"}, "config must be a JSON object"),
        ("d", {"config": "{not json"}, r"damaged checkpoint metadata \(config:"),
        ("e", {"graph": '{"name": "../x", "variables": {"a": [0, 1]}}'}, "graph name '../x'"),
        ("f", {"format": "something-else/9"}, "not a cfedit checkpoint \\(format 'something-else/9'\\)"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(_tampered(tmp_path, f"{name}.safetensors", **changes))


def test_a_checkpoint_keeps_the_training_recipe_of_its_time(tmp_path):
    """A graph file's fit: options are checked against today's trainers; a checkpoint's record of how
    it was trained is not, so older checkpoints still load."""
    from safetensors import safe_open

    from cfedit.checkpoint import read_checkpoint_graph
    from cfedit.causal.graph_file import graph_from_dict

    with safe_open(str(FRONTDOOR_CKPT), "pt") as f:
        graph = dict(json.loads(f.metadata()["graph"]), fit={"calibrate": True})
    assert read_checkpoint_graph(_tampered(tmp_path, "old.safetensors", graph=json.dumps(graph))).fit == {
        "calibrate": True}
    with pytest.raises(GraphError, match="unknown key 'calibrate'"):
        graph_from_dict(graph)


def test_tampered_checkpoint_through_edit_is_one_line_exit_2(tmp_path):
    bad = _tampered(tmp_path, "nofeat.safetensors", config=_config(features=None))
    r = cli("edit", REPO / "examples" / "digit2_red_nobar.png", "--set", "digit=3", "-c", bad, "--out", tmp_path / "o")
    one_line(r, 2, f"{bad}: damaged checkpoint: no config section 'features'")


@pytest.mark.parametrize("cut,message", [
    (lambda b: b[: len(b) // 2], "damaged checkpoint (safetensors could not read it"),
    (lambda b: b[:6], "no safetensors header"),
    (lambda b: b"\xff" * 64, "no safetensors header"),
    (lambda b: struct.pack("<Q", 12) + b"{not json!!}", "its safetensors header is damaged"),
    (lambda b: struct.pack("<Q", 2) + b"{}", "format None"),
])
def test_truncated_and_foreign_files_are_refused_before_tensors_load(tmp_path, cut, message):
    from cfedit.checkpoint import load_checkpoint, read_checkpoint_graph

    p = tmp_path / "x.safetensors"
    p.write_bytes(cut(FRONTDOOR_CKPT.read_bytes()))
    for read in (load_checkpoint, read_checkpoint_graph):
        if read is read_checkpoint_graph and "could not read" in message:
            continue  # the header of a half file is intact: its graph can be read
        with pytest.raises(CheckpointError) as e:
            read(p)
        assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change,message", [
    ({"hidden": 10 ** 9}, "tensor 'mechanism.enc_fc.0.weight' has shape [256, 3150], but its 'mechanism' "
                          "config makes [1000000000, 3150]"),
    ({"hidden": 128}, "makes [128, 3150]"),
    ({"latent": "many"}, "its 'mechanism' config cannot be built"),
    ({"kind": "gan"}, "its 'mechanism' config cannot be built"),
])
def test_module_configs_are_checked_against_stored_shapes_before_allocating(tmp_path, change, message):
    """hidden=10^9 would need 12 TB; the meta-device skeleton finds the mismatch first."""
    from cfedit.checkpoint import load_checkpoint
    from cfedit.image import mechanism_from_config

    mechanism = dict(json.loads(_config())["mechanism"], **change)
    ck = load_checkpoint(_tampered(tmp_path, "m.safetensors", config=_config(mechanism=mechanism)))
    with pytest.raises(CheckpointError) as e:
        ck.module("mechanism", mechanism_from_config)
    assert message in str(e.value) and len(str(e.value)) < 400


def test_module_loads_a_sound_checkpoint_and_names_missing_tensors(tmp_path):
    from safetensors.torch import load

    from cfedit.checkpoint import load_checkpoint
    from cfedit.image import Labeller, mechanism_from_config

    ck = load_checkpoint(FRONTDOOR_CKPT)
    lab = ck.module("labeller", Labeller.from_config)
    assert next(lab.parameters()).device.type == "cpu"
    assert all(lab.state_dict()[k].equal(v) for k, v in ck.section("labeller").items())
    tensors = {k: v for k, v in load(FRONTDOOR_CKPT.read_bytes()).items() if k != "mechanism.dec_fc.0.bias"}
    broken = load_checkpoint(_tampered(tmp_path, "t.safetensors", tensors))
    with pytest.raises(CheckpointError, match=r"no tensor 'mechanism.dec_fc.0.bias' \(1 missing\)"):
        broken.module("mechanism", mechanism_from_config)


def test_training_state_files_never_run_code_nor_advise_unsafe_loading(tmp_path):
    import torch

    from cfedit.checkpoint import load_state_file

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    evil = tmp_path / "x.partial"
    buf = io.BytesIO()
    torch.save({"stage": Payload()}, buf)
    evil.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError) as e:
        load_state_file(evil)
    assert "weights_only" not in str(e.value) and "delete it" in str(e.value)
    assert not (tmp_path / "ran").exists()
    (tmp_path / "junk.partial").write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="junk.partial: not a training state file"):
        load_state_file(tmp_path / "junk.partial")
    good = tmp_path / "good.partial"
    torch.save({"epoch": 3, "w": torch.ones(2)}, good)
    assert load_state_file(good)["epoch"] == 3


# ==============================================================================================
# Bounds: P(V) as a dense table is refused up front with the size it would need
# ==============================================================================================

def test_bounds_over_30_binary_factors_are_refused_before_any_table(tmp_path):
    names = [f"v{i}" for i in range(30)]
    p = write(tmp_path, "variables:\n" + "".join(f"  {n}: [no, yes]\n" for n in names))
    labels = tmp_path / "labels.csv"
    labels.write_text(",".join(names) + "\n" + ",".join(["no"] * 30) + "\n")
    r = cli("bounds", "-g", p, "--data", labels, "-q", "P(v1_{v0=yes}=yes)")
    one_line(r, 2, "1,073,741,824 joint configurations", "8.0 GiB", "over the limit of 16,777,216")


def test_bounds_size_limit_is_exact():
    from cfedit.causal.pv import MAX_PV_CELLS, check_pv_size
    from cfedit.causal.graph_file import graph_from_dict

    def binary(k: int):
        return graph_from_dict({"name": "b", "variables": {f"v{i}": ["no", "yes"] for i in range(k)}})

    assert 2 ** 24 == MAX_PV_CELLS
    check_pv_size(binary(24))
    with pytest.raises(BoundsError, match="33,554,432 joint configurations"):
        check_pv_size(binary(25))


# ==============================================================================================
# Queries: long and strange input stays linear and one short line
# ==============================================================================================

def test_long_and_strange_queries_are_one_short_line():
    from cfedit.causal.graph_file import load_graph
    from cfedit.causal.query import parse_query

    g = load_graph("backdoor")
    long = "P(" + ", ".join(["bar=yes"] * 20_000) + ")" + " " * 100_000
    assert len(parse_query(long).targets) == 20_000
    with pytest.raises(QueryError) as e:
        parse_query("P(" + "digit=3, " * 20_000 + "bar=é)")
    assert "'é'" in str(e.value) and len(str(e.value)) < 300
    r = cli("bounds", "-g", "backdoor", "-q", "P(bar_{color=red}=yes\x1b[2J)")
    assert "\x1b" not in one_line(r, 2, "unexpected character '\\x1b'")
    with pytest.raises(QueryError, match="unknown variable 'colour'"):
        parse_query("P(bar_{colour=red}=yes)").validate(g)


# ==============================================================================================
# Writes: checked before long runs, atomic, resumable; never half a file, never outside the target
# ==============================================================================================

def test_destination_checks(tmp_path):
    from cfedit.files import check_writable

    check_writable(tmp_path / "new" / "sub" / "m.safetensors")  # folders are made
    assert not [p for p in (tmp_path / "new" / "sub").iterdir()]  # and the probe is gone
    with pytest.raises(DestinationError, match="is a folder"):
        check_writable(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DestinationError, match="afile: cannot write the checkpoint there"):
        check_writable(tmp_path / "afile" / "m.safetensors", "checkpoint")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc to stand for an unwritable destination")
def test_fit_onto_an_unwritable_destination_fails_before_training(tmp_path):
    """(/proc takes no new files, even for root, which ignores permission bits.)"""
    r = cli("fit", "--graph", "backdoor", "--out", "/proc/cfedit-test.safetensors", "--device", "cpu")
    one_line(r, 2, "/proc: cannot write the checkpoint there")


def test_fit_resume_from_is_checked_before_training(tmp_path, mnist_root):
    out = tmp_path / "m.safetensors"
    base = ["fit", "--graph", "backdoor", "--out", out, "--device", "cpu", "--mnist-root", mnist_root]
    one_line(cli(*base, "--resume", "--resume-from", tmp_path / "s.state"), 2, "choose one")
    one_line(cli(*base, "--resume-from", tmp_path / "s.state"), 2, "s.state: no such training state")
    (tmp_path / "s.state").write_bytes(b"\x80\x04junk")
    one_line(cli(*base, "--resume-from", tmp_path / "s.state"), 2, "not a training state file cfedit wrote")
    (tmp_path / "m.safetensors.state").write_text("x")
    one_line(cli(*base, "--keep-state"), 2, "m.safetensors.state exists; pass --force")


def test_atomic_writes_name_the_destination_and_leave_nothing(tmp_path):
    from cfedit.files import atomic_write_bytes

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "afile" / "out.png", b"data")
    assert e.value.filename == str(tmp_path / "afile" / "out.png")
    target = tmp_path / "d" / "out.png"
    atomic_write_bytes(target, b"data", durable=False)
    assert target.read_bytes() == b"data" and [p.name for p in target.parent.iterdir()] == ["out.png"]


def test_data_barmnist_out_that_is_a_file_or_under_one(tmp_path, mnist_root):
    (tmp_path / "afile").write_text("x")
    one_line(cli("data", "barmnist", "backdoor", "--n", "5", "--out", tmp_path / "afile"), 2,
             "afile exists and is not a folder")
    one_line(cli("data", "barmnist", "backdoor", "--n", "5", "--out", tmp_path / "afile" / "sub", "--mnist-root",
                 mnist_root), 2, "afile/sub/", "cannot write the data set")
    one_line(cli("data", "barmnist", "backdoor", "--n", "1000000001", "--out", tmp_path / "big"), 2,
             "must be from 1 to 1,000,000")
    assert not (tmp_path / "big").exists()


def test_data_barmnist_interrupted_leaves_whole_pngs_and_resumes_exactly(tmp_path, monkeypatch, mnist_root):
    import cfedit.data.barmnist as bm

    fresh = tmp_path / "fresh"
    bm.write_barmnist("backdoor", 12, seed=4, out=fresh, root=mnist_root)
    out = tmp_path / "out"
    real, calls = bm.png_bytes, []

    def interrupted(image):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(image)

    monkeypatch.setattr(bm, "png_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bm.write_barmnist("backdoor", 12, seed=4, out=out, root=mnist_root)
    monkeypatch.setattr(bm, "png_bytes", real)
    names = sorted(p.name for p in out.iterdir())
    assert names == [bm.RUN_FILE] + [f"{i:06d}.png" for i in range(5)]  # no labels.csv, no temp file
    (out / "000004.png").write_bytes(b"")  # as a writer without temp files leaves it
    args = ["data", "barmnist", "backdoor", "--n", "12", "--seed", "4", "--out", out, "--mnist-root", mnist_root]
    one_line(cli(*args), 2, "holds an interrupted run (no labels.csv); pass --resume")
    one_line(cli(*args[:4], "5", *args[5:], "--resume"), 2, "holds a run of setting backdoor, split train, n 12, seed 4")
    one_line(cli(*args, "--resume", "--force"), 2, "choose one")
    r = cli(*args, "--resume")
    assert r.exit_code == 0 and "4 of them kept" in r.stdout, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    for p in fresh.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("args", [["fit", "--graph", "backdoor", "--device", "meta"],
                                  ["fit", "--graph", "backdoor", "--seed", "-1"],
                                  ["eval", "--graph", "backdoor", "--seed", "-1"]])
def test_devices_and_seeds_outside_what_cfedit_runs_on_are_one_line(args):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "cfedit: error:" in r.output
