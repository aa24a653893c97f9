"""A few hundred PIL-drawn shapes at 32x32 with three confounded factors, and their labels.csv."""
import csv, sys
from pathlib import Path
import numpy as np
from PIL import Image, ImageDraw

out = Path(sys.argv[1]); n = int(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
rows = []
for i in range(n):
    u = rng.random()                                  # the hidden common cause of shape and color
    shape = "circle" if rng.random() < 0.3 + 0.4 * u else "square"
    color = "red" if rng.random() < 0.2 + 0.6 * u else "blue"
    p_large = 0.2 + 0.5 * (shape == "square") + 0.2 * (color == "red")
    size = "large" if rng.random() < p_large else "small"
    r = 11 if size == "large" else 6
    cx, cy = rng.integers(r + 2, 32 - r - 2, 2)
    img = Image.new("RGB", (32, 32), (235, 235, 235))
    d = ImageDraw.Draw(img)
    fill = (200, 30, 30) if color == "red" else (30, 60, 200)
    box = [cx - r, cy - r, cx + r, cy + r]
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=fill)
    name = f"{i:04d}.png"
    img.save(out / name)
    rows.append([name, shape, color, size])
with open(out / "labels.csv", "w", newline="") as f:
    w = csv.writer(f); w.writerow(["image_id", "shape", "color", "size"]); w.writerows(rows)
