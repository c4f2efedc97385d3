"""Photo input: decode any photo a user is likely to have into uint8 RGB, or say why not.

Every decode problem becomes `facepq_core.errors.BadImage(reason, detail)` with a short
`reason` key that run summaries count (see `opqn_model.datasets.SkipCounter`):

    unreadable     the file is missing or cannot be read (permissions, a folder)
    not_an_image   empty, or bytes no image decoder recognises (a text file named .jpg)
    truncated      a JPEG/PNG whose end is missing (an interrupted copy or download)
    corrupt        the header decodes but the image data does not
    too_large      more pixels than PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`)
    tiny           either side below MIN_SIDE pixels: too small to hold a usable face

Kinds of photo a user expects to work are converted, not refused, and the
conversion is reported by `load_image_with_note` so runs can count them:
grey and bilevel ('converted_grey'), 16/32-bit grey scaled to 8 bits
('converted_16bit'), float grey ('converted_float'), CMYK ('converted_cmyk'),
transparency composited over white ('converted_rgba'), palette
('converted_palette'), other colour spaces ('converted_<mode>'). EXIF orientation
is applied so phone photos come out upright.

Truncation is checked on the bytes as well as by the decoder, because any
library in the process may set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`,
which makes PIL silently fill the missing part with grey.
"""
from __future__ import annotations

import io
import logging
import os

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from facepq_core.errors import BadImage

log = logging.getLogger(__name__)

MIN_SIDE = 32
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_image(source: str | os.PathLike | bytes) -> np.ndarray:
    """Decode a photo into RGB.

    Parameters
    ----------
    source : path (str / PathLike) or the file's bytes

    Returns
    -------
    np.ndarray uint8 [H, W, 3], C-contiguous, H and W >= MIN_SIDE.

    Raises
    ------
    BadImage with `.reason` one of the keys in the module docstring.
    """
    return load_image_with_note(source)[0]


def load_image_with_note(source: str | os.PathLike | bytes) -> tuple[np.ndarray, str | None]:
    """Like `load_image`, also returning which conversion happened (None for plain RGB)."""
    data, name = read_bytes(source)
    if not data:
        raise BadImage("not_an_image", f"{name} is empty")
    if _looks_truncated(data):
        raise BadImage("truncated", f"{name} ends before the image does (incomplete copy or download?)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage("too_large", f"{name}: {exc}") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage("not_an_image", f"{name} is not an image file PIL can identify ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is a bad image
        raise BadImage("not_an_image", f"{name}: {type(exc).__name__}: {exc}") from None
    with image:
        _check_size(image, name)
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError as exc:
            raise BadImage("too_large", f"{name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error...
            if "truncated" in str(exc):
                raise BadImage("truncated", f"{name}: {exc}") from None
            raise BadImage("corrupt", f"{name}: header is readable but the image data is not ({exc})") from None
        try:
            rgb, note = _to_rgb(image)
        except Exception as exc:  # noqa: BLE001 - exotic modes PIL cannot convert
            raise BadImage("corrupt", f"{name}: cannot convert mode {image.mode} to RGB ({exc})") from None
    if rgb.shape[0] < MIN_SIDE or rgb.shape[1] < MIN_SIDE:
        raise BadImage("tiny", f"{name} is {rgb.shape[1]}x{rgb.shape[0]} px; need at least {MIN_SIDE} px a side")
    return np.ascontiguousarray(rgb, dtype=np.uint8), note


def read_bytes(source: str | os.PathLike | bytes) -> tuple[bytes, str]:
    """The content of `source` and a name for messages. Raises BadImage('unreadable')."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    name = os.fspath(source)
    try:
        with open(name, "rb") as fh:
            return fh.read(), name
    except FileNotFoundError:
        raise BadImage("unreadable", f"{name} does not exist") from None
    except IsADirectoryError:
        raise BadImage("unreadable", f"{name} is a folder, not a photo") from None
    except PermissionError:
        raise BadImage("unreadable", f"{name}: permission denied") from None
    except OSError as exc:
        raise BadImage("unreadable", f"{name}: {exc.strerror or exc}") from None


def _looks_truncated(data: bytes) -> bool:
    """True when a JPEG or PNG visibly lacks its end marker."""
    if data.startswith(_JPEG_MAGIC):
        # Entropy-coded data never contains FF D9 (FF bytes are stuffed as FF 00), so a
        # complete file has an EOI marker after the start of its last scan (SOS).
        last_scan = data.rfind(b"\xff\xda")
        return last_scan != -1 and data.find(b"\xff\xd9", last_scan) == -1
    if data.startswith(_PNG_MAGIC):
        # The IEND chunk closes every complete PNG; only a few bytes of junk may follow it.
        return data.rfind(b"IEND") == -1
    return False


def _check_size(image: Image.Image, name: str) -> None:
    # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse there too rather than
    # decode a bomb, without touching the process-wide warnings filter.
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise BadImage("too_large", f"{name} is {image.width}x{image.height} px, over the {limit} pixel limit")


def _to_rgb(image: Image.Image) -> tuple[np.ndarray, str | None]:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image), None
    if mode in ("L", "1"):
        return _grey_to_rgb(np.asarray(image.convert("L"))), "converted_grey"
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I (32-bit int)
        return _grey_to_rgb(_scale_int_to_8bit(np.asarray(image))), "converted_16bit"
    if mode == "F":
        return _grey_to_rgb(_scale_float_to_8bit(np.asarray(image))), "converted_float"
    if mode == "CMYK":
        return np.asarray(image.convert("RGB")), "converted_cmyk"
    if mode == "P":
        if "transparency" in image.info:
            return _over_white(image.convert("RGBA")), "converted_rgba"
        return np.asarray(image.convert("RGB")), "converted_palette"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _over_white(image.convert("RGBA")), "converted_rgba"
    return np.asarray(image.convert("RGB")), f"converted_{mode.lower().replace(';', '')}"


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def _scale_int_to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit) grey -> 8 bits by scaling the full range, not clipping at 255."""
    values = values.astype(np.float64)
    top = 65535.0 if values.max(initial=0) <= 65535 else float(values.max())
    values = np.clip(values, 0, None) * (255.0 / top)
    return np.rint(values).astype(np.uint8)


def _scale_float_to_8bit(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64))
    lo, hi = float(values.min(initial=0)), float(values.max(initial=0))
    if lo >= 0 and hi <= 1:  # the usual [0, 1] float convention
        return np.rint(values * 255).astype(np.uint8)
    span = hi - lo if hi > lo else 1.0
    return np.rint((values - lo) * (255.0 / span)).astype(np.uint8)


def _over_white(rgba: Image.Image) -> np.ndarray:
    """Composite onto white: transparent background is usually white in the photo's intent."""
    arr = np.asarray(rgba).astype(np.float32)
    alpha = arr[:, :, 3:4] / 255.0
    rgb = arr[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
    return np.rint(rgb).astype(np.uint8)


# Keep PIL's own safety on: a truncated file must fail loudly in this module.
if ImageFile.LOAD_TRUNCATED_IMAGES:
    log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by another library; "
                "facepq still detects truncated JPEG/PNG files from their bytes")
