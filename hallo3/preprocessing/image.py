"""Portrait file -> RGB image, and framing to the model's 3:2 resolution (architecture 7.1 step 4, 12.19).

Every photo is fitted whole into the model's frame between black bars, as the official code does for squares, and the
output frames are cropped back to the photo: a video has the photo's aspect and orientation (the official code
centre-crops other shapes to 3:2, which can cut the face off). The face region keeps a margin to the frame's edges.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """The image input breaks a rule; the message names the file and the rule."""


MAX_PIXELS = 50_000_000


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


FACE_MARGIN = 0.1  # the face region keeps this fraction of its own width (height) free on its left and right
# (above and below) inside the model's frame; where the photo ends closer to the face, the margin is black


@dataclass(frozen=True)
class Framing:
    """Where a portrait sits in the model's `width` x `height` frame, and how the output frames are cropped back to it.

    Attributes:
        image_size: (width, height) of the photo, after its EXIF rotation.
        content_box: (left, top, right, bottom): the frame's pixels that hold the resized photo; the rest is black.
            Its width and height are even, as H.264 (yuv420p) needs, so the aspect can be off by a pixel's rounding.
    """

    width: int
    height: int
    image_size: tuple[int, int]
    content_box: tuple[int, int, int, int]

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the video: the photo's place in the frame."""
        left, top, right, bottom = self.content_box
        return right - left, bottom - top

    def crop_output(self, frames: np.ndarray) -> np.ndarray:
        """[..., height, width, 3] -> [..., output height, output width, 3]: the photo's part of each frame."""
        left, top, right, bottom = self.content_box
        return frames[..., top:bottom, left:right, :]

    def to_frame(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in the photo's pixels -> the same region in the frame's pixels."""
        left, top, right, bottom = self.content_box
        scale_x, scale_y = (right - left) / self.image_size[0], (bottom - top) / self.image_size[1]
        x0, y0, x1, y1 = box
        return left + x0 * scale_x, top + y0 * scale_y, left + x1 * scale_x, top + y1 * scale_y

    def report(self) -> dict:
        """The framing for `face.json`: photo size, where it went in the model's frame, the bars, the video size."""
        left, top, right, bottom = self.content_box
        return {
            "image_size": list(self.image_size),
            "frame_size": [self.width, self.height],
            "photo_in_frame": [left, top, right, bottom],
            "padding": {"left": left, "top": top, "right": self.width - right, "bottom": self.height - bottom},
            "output_size": list(self.output_size),
        }

    def describe(self) -> str:
        """The framing in words, for the log and the mp4's metadata."""
        (w, h), (out_w, out_h) = self.image_size, self.output_size
        return f"{w}x{h} photo in the {self.width}x{self.height} frame, video {out_w}x{out_h}"


def pad_square(image: Image.Image, width: int, height: int, resample: Image.Resampling) -> Image.Image:
    """`image` resized to a `height` x `height` square (whatever its aspect) with `resample`, centred between black
    bars on a `width` x `height` canvas: the official framing of squares at inference (bilinear) and of every
    talking-head frame in training (bicubic; architecture 12.19)."""
    left = left_bar(width, height)
    return paste_resized(image, width, height, (left, 0, left + height, height), resample)


def left_bar(width: int, height: int) -> int:
    """The width of the left bar of `pad_square`: the square's first column."""
    return (width - height) // 2


def paste_resized(
    image: Image.Image, width: int, height: int, box: tuple[int, int, int, int], resample: Image.Resampling
) -> Image.Image:
    """A black `width` x `height` canvas with `image` resized into `box` (left, top, right, bottom)."""
    left, top, right, bottom = box
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image.resize((right - left, bottom - top), resample, reducing_gap=None), (left, top))
    return canvas


def fit_in_frame(
    size: tuple[int, int], face_region: tuple[float, float, float, float] | None, width: int, height: int
) -> tuple[int, int, int, int]:
    """Where a photo of `size` goes in a `width` x `height` frame: (left, top, right, bottom).

    The photo is scaled to fit whole, keeping its aspect, and centred. When `face_region` (x0, y0, x1, y1, the photo's
    pixels; the official mask box) with `FACE_MARGIN` around it reaches past the photo, that extent must fit too, and
    the photo moves off centre the least that keeps the margin inside the frame. A square with its face away from the
    edges gets the official square framing: `height` x `height`, `left_bar` from the left.
    """
    w, h = size
    # the extent that must fit, in the photo's pixels: the photo, and the face region with its margin
    x_low, y_low, x_high, y_high = 0.0, 0.0, float(w), float(h)
    if face_region is not None:
        x0, y0, x1, y1 = (float(v) for v in face_region)
        margin_x, margin_y = FACE_MARGIN * (x1 - x0), FACE_MARGIN * (y1 - y0)
        x_low, x_high = min(x_low, x0 - margin_x), max(x_high, x1 + margin_x)
        y_low, y_high = min(y_low, y0 - margin_y), max(y_high, y1 + margin_y)
    scale = min(width / (x_high - x_low), height / (y_high - y_low))
    content_w = _even(w * scale, width * w / (x_high - x_low))
    content_h = _even(h * scale, height * h / (y_high - y_low))
    left = _place(width, content_w, x_low * content_w / w, x_high * content_w / w)
    top = _place(height, content_h, y_low * content_h / h, y_high * content_h / h)
    return left, top, left + content_w, top + content_h


def _even(length: float, limit: float) -> int:
    """`length` rounded to the nearest even number of pixels, or to the even number below when that one is more than
    `limit` (the most that keeps the photo and the face's margin in the frame); at least 2."""
    even = 2 * round(length / 2)
    return max(2, even - 2 if even > limit + 1e-6 else even)


def _place(frame: int, content: int, low: float, high: float) -> int:
    """The offset of `content` pixels in `frame`: centred, moved the least so that [offset + low, offset + high)
    (the face region with its margin, relative to the content's start) stays inside, and the content too."""
    offset = (frame - content) // 2
    offset = max(offset, int(np.ceil(-low)))  # the margin's low end at 0 or after
    offset = min(offset, int(np.floor(frame - high)))  # and its high end at `frame` or before
    return max(0, min(offset, frame - content))


def frame_portrait(
    image: Image.Image,
    face_region: tuple[float, float, float, float] | None,
    width: int,
    height: int,
    extra_images: tuple[Image.Image, ...] = (),
) -> tuple[list[Image.Image], Framing]:
    """Fit `image` (and `extra_images` of the same size, e.g. its face-masked copy) into `width` x `height`.

    Every shape is resized like the official square (bilinear) into `fit_in_frame`'s box between black bars.

    Args:
        face_region: (x0, y0, x1, y1) in the image's pixels, the official mask box (`FaceInfo.mask_box`): it stays
            inside the frame with `FACE_MARGIN` around it.

    Returns:
        The framed images (the first is `image`) and the `Framing` that crops the output back to the photo.
    """
    content_box = fit_in_frame(image.size, face_region, width, height)
    framed = [paste_resized(item, width, height, content_box, Image.BILINEAR) for item in (image, *extra_images)]
    return framed, Framing(width, height, image.size, content_box)
