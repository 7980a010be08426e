"""scikit-learn's bundled handwritten digits, as 1x32x32 images.

The 8x8 images (values 0..16, bright ink on black) become 8-bit grayscale
images and are resized to 32x32 with Pillow's bilinear filter: the very
pipeline serving applies to a PNG, so there is no train/serve skew.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

BACKGROUND = (0,)  # ink is bright on black; serving composites transparent images onto it
SPLIT_SEED = 0
TEST_FRACTION = 0.25


def digit_to_image(pixels: np.ndarray) -> Image.Image:
    """An 8x8 array of 0..16 as an 8-bit grayscale image (ink bright)."""
    return Image.fromarray(np.round(pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8), "L")


def image_to_array(image: Image.Image, size: int = 32) -> np.ndarray:
    """Grayscale, resize, scale to [0, 1]: [1, size, size] float32."""
    image = image.convert("L").resize((size, size), Image.BILINEAR)
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]


def load_digits_split(size: int = 32):
    """Return (x_train, y_train, x_test, y_test, test_pixels) with a fixed stratified split.

    x_*: [N, 1, size, size] float32 in [0, 1]; test_pixels: the raw 8x8 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    images = np.stack([image_to_array(digit_to_image(p), size) for p in digits.data])
    y = digits.target.astype(np.int64)
    return images[train_idx], y[train_idx], images[test_idx], y[test_idx], digits.data[test_idx]


def validation_split(x: np.ndarray, y: np.ndarray, fraction: float = 0.1):
    """Split a stratified, seeded validation set off the training split."""
    from sklearn.model_selection import train_test_split

    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=fraction, stratify=y, random_state=SPLIT_SEED
    )
    return x_train, y_train, x_val, y_val
