"""Portrait file -> RGB image, and framing to the model's 3:2 resolution (architecture 7.1 step 4, 12.19).

Squares are padded to 3:2 with black bars and the output is cropped back to a square, as the official code does.
Other aspect ratios are resized like the official code and cropped to 3:2 around the detected face, so the face is
never cut off (the official centre crop can cut it).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """The image input breaks a rule; the message names the file and the rule."""


MAX_PIXELS = 50_000_000
HEAD_MARGIN = 1.5  # crop window keeps the face box grown by this factor, when it fits


def load_image(path: str | Path, name: str | None = None) -> Image.Image:
    """RGB image with its EXIF rotation applied; grayscale (8 or 16 bit), palette and RGBA photos are converted.

    The size is checked from the header before any pixel is decoded: PIL's own bomb check only fires at twice its
    limit, and a small file can hold a huge blank image. `name` is how errors name the file (default: the path).
    """
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise ImageError(f"image {name}: no such file.")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(
                    f"image {name}: {image.width}x{image.height} is more than {MAX_PIXELS:,} pixels; resize it first."
                )
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                image = _to_8_bit(image)
            if image.mode in ("RGBA", "LA", "P"):
                # transparent pixels become white, not the undefined colour under them
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            image = image.convert("RGB")
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"image {name}: not an image file (PNG, JPEG, WebP, ... expected).") from None
    except Image.DecompressionBombError:
        raise ImageError(f"image {name}: more than {MAX_PIXELS:,} pixels; resize it first.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"image {name}: the file is damaged or truncated ({error}).") from None
    if min(image.size) < 16:
        raise ImageError(f"image {name}: {image.width}x{image.height} px is too small to hold a face.")
    return image


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale -> 8-bit "L". PIL's own conversion clips every value above 255 to white."""
    values = np.asarray(image, dtype=np.float64)
    full_scale = 65535.0 if image.mode.startswith("I") and values.max(initial=0) > 255 else 255.0
    if image.mode == "F" and values.max(initial=0) <= 1.0:
        full_scale = 1.0
    return Image.fromarray(np.clip(values / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8))


@dataclass
class Framing:
    """How a portrait was fitted to the model's width x height, and how to undo it on the output frames."""

    width: int
    height: int
    square: bool  # padded with bars; output frames are cropped back to columns [pad, pad + height)
    pad: int = 0
    source_box: tuple[float, float, float, float] | None = None  # the input region (x0, y0, x1, y1) in the frame

    def crop_output(self, frames: np.ndarray) -> np.ndarray:
        """[..., height, width, 3] -> the user's aspect: square inputs give square videos."""
        return frames[..., :, self.pad : self.pad + self.height, :] if self.square else frames


def pad_square(image: Image.Image, width: int, height: int, resample: Image.Resampling) -> Image.Image:
    """`image` resized to a `height` x `height` square (whatever its aspect) with `resample`, centred between black
    bars on a `width` x `height` canvas: the official framing of squares at inference (bilinear) and of every
    talking-head frame in training (bicubic; architecture 12.19)."""
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image.resize((height, height), resample, reducing_gap=None), (left_bar(width, height), 0))
    return canvas


def left_bar(width: int, height: int) -> int:
    """The width of the left bar of `pad_square`: the square's first column."""
    return (width - height) // 2


def frame_portrait(
    image: Image.Image,
    face_box: tuple[float, float, float, float] | None,
    width: int,
    height: int,
    extra_images: tuple[Image.Image, ...] = (),
) -> tuple[list[Image.Image], Framing]:
    """Fit `image` (and `extra_images` of the same size, e.g. its face-masked copy) to `width` x `height`.

    Args:
        face_box: (x0, y0, x1, y1) in the image's pixels; the crop keeps it whole when it fits.

    Returns:
        The framed images (the first is `image`) and the `Framing` that maps the output back.
    """
    images = (image, *extra_images)
    w, h = image.size
    if w == h:
        framed = [pad_square(item, width, height, Image.BILINEAR) for item in images]
        source_box = (0.0, 0.0, float(w), float(h))
        return framed, Framing(width, height, square=True, pad=left_bar(width, height), source_box=source_box)

    # the official resize: cover width x height keeping the aspect, bicubic
    if w / h > width / height:
        new_w, new_h = int(w * height / h), height
    else:
        new_w, new_h = width, int(h * width / w)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    if face_box is not None:
        # a detector box stops at the brows and the chin: keep a margin for hair and neck when it fits
        scale_x, scale_y = new_w / w, new_h / h
        x0, y0, x1, y1 = face_box[0] * scale_x, face_box[1] * scale_y, face_box[2] * scale_x, face_box[3] * scale_y
        cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * HEAD_MARGIN / 2, (y1 - y0) * HEAD_MARGIN / 2
        if 2 * half_w <= width and 2 * half_h <= height:
            x0, x1 = max(0.0, cx - half_w), min(float(new_w), cx + half_w)
            y0, y1 = max(0.0, cy - half_h), min(float(new_h), cy + half_h)
        left = _shift_to_contain(left, width, x0, x1, new_w)
        top = _shift_to_contain(top, height, y0, y1, new_h)
    framed = [
        item.resize((new_w, new_h), Image.BICUBIC).crop((left, top, left + width, top + height)) for item in images
    ]
    source_box = (left * w / new_w, top * h / new_h, (left + width) * w / new_w, (top + height) * h / new_h)
    return framed, Framing(width, height, square=False, source_box=source_box)


def _shift_to_contain(start: int, size: int, low: float, high: float, limit: int) -> int:
    """Move a window [start, start + size) the least so that it contains [low, high), staying inside [0, limit)."""
    if high - low > size:
        start = int(round((low + high) / 2 - size / 2))  # face larger than the frame: centre on it
    elif low < start:
        start = int(np.floor(low))
    elif high > start + size:
        start = int(np.ceil(high)) - size
    return max(0, min(start, limit - size))
