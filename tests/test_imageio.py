"""cfedit.imageio: center squares, full-resolution originals and applying a model-size edit to them."""

import io

import numpy as np
import pytest
from PIL import Image

from cfedit.imageio import ImageReadError, apply_change, center_square, decode_image, read_original


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_center_square():
    assert center_square(50, 30) == (10, 0, 30)
    assert center_square(30, 51) == (0, 10, 30)
    assert center_square(64, 64) == (0, 0, 64)


def test_null_change_returns_original_byte_identical(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)        # 50 wide, 30 high
    gray = rng.integers(0, 256, (41, 23), dtype=np.uint8)          # 23 wide, 41 high
    for arr, channels, size in ((rgb, 3, 28), (gray, 1, 64)):
        path = tmp_path / f"x{channels}.png"
        path.write_bytes(png(arr))
        original = read_original(path, channels)
        assert original.dtype == np.uint8 and original.shape == (channels, *arr.shape[:2])
        x, _ = decode_image(path.read_bytes(), size, channels)
        out = apply_change(original, x, x.copy())
        assert out.dtype == np.uint8 and out.shape == original.shape
        assert out.tobytes() == original.tobytes()


def test_constant_change_on_square_input():
    original = np.full((3, 128, 128), 128, dtype=np.uint8)
    x = np.full((3, 64, 64), 100, dtype=np.uint8)
    y = x + 51                                                     # change of 51/255 = +0.2 everywhere
    out = apply_change(original, x, y)
    assert out.shape == (3, 128, 128)
    assert np.all(np.abs(out.astype(int) - (128 + 51)) <= 1)
    # clipped at white, not wrapped around
    assert np.all(apply_change(np.full((3, 128, 128), 250, np.uint8), x, y) == 255)


def test_non_square_changes_only_the_center_square():
    rng = np.random.default_rng(1)
    original = rng.integers(60, 190, (3, 30, 50), dtype=np.uint8)   # center square: columns 10..39
    x = np.full((3, 28, 28), 100, dtype=np.uint8)
    y = x - 40                                                     # darken by 40/255
    out = apply_change(original, x, y)
    assert out.shape == original.shape
    assert np.array_equal(out[:, :, :10], original[:, :, :10])
    assert np.array_equal(out[:, :, 40:], original[:, :, 40:])
    inside = out[:, :, 10:40].astype(int) - original[:, :, 10:40].astype(int)
    assert np.all(np.abs(inside + 40) <= 1)
    # a tall grayscale image: rows outside the center square are untouched
    tall = rng.integers(60, 190, (1, 50, 30), dtype=np.uint8)
    out = apply_change(tall, x[:1], y[:1])
    assert np.array_equal(out[:, :10], tall[:, :10]) and np.array_equal(out[:, 40:], tall[:, 40:])
    assert np.all(np.abs(out[:, 10:40].astype(int) - tall[:, 10:40].astype(int) + 40) <= 1)


def test_read_original_converts_mode_and_reports_bad_files(tmp_path):
    p = tmp_path / "rgba.png"
    Image.new("RGBA", (7, 5), (10, 20, 30, 255)).save(p)
    assert read_original(p, 3).shape == (3, 5, 7)
    assert read_original(p, 1).shape == (1, 5, 7)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"bad\.png: cannot decode image"):
        read_original(bad, 3)
    with pytest.raises(ImageReadError, match=r"missing\.png: cannot read"):
        read_original(tmp_path / "missing.png", 3)
    with pytest.raises(ImageReadError, match=r"bad\.png: cannot decode image"):
        decode_image(bad.read_bytes(), 28, 3, str(bad))


def test_grid_is_torchvisions_make_grid_at_the_images_own_channels():
    import numpy as np

    from cfedit.imageio import image_grid, side_by_side

    def reference(images, ncol, pad=2):  # the contact sheet as cfedit drew it before make_grid
        n, c, h, w = images.shape
        ncol = max(1, min(ncol, n))
        out = np.full((c, -(-n // ncol) * (h + pad) + pad, ncol * (w + pad) + pad), 128, np.uint8)
        for i in range(n):
            r, q = divmod(i, ncol)
            out[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
        return out

    rng = np.random.default_rng(0)
    for n, c in ((1, 3), (2, 3), (5, 3), (11, 1), (3, 1)):
        x = rng.integers(0, 256, (n, c, 6, 7), dtype=np.uint8)
        assert np.array_equal(image_grid(x, ncol=4), reference(x, 4)), (n, c)
    a, b = rng.integers(0, 256, (2, 3, 5, 5), dtype=np.uint8)
    assert np.array_equal(side_by_side(a, b), reference(np.stack([a, b]), 2))
