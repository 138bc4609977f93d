"""Image bytes -> normalised NCHW tensor, exactly as the model card prescribes; and a minimal multipart reader.

The multipart reader is a few lines of our own because FastAPI's form parsing needs `python-multipart`,
which is not a dependency of okdpipe; one file field is all `/classify` accepts.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from okdpipe.contracts.card import Preprocess
from okdpipe.contracts.pixels import IMAGE_FORMATS, MAX_IMAGE_PIXELS, UnsupportedImage, image_pixels
from okdpipe.serve.protocol import ClientError


def image_to_tensor(data: bytes, recipe: Preprocess) -> np.ndarray:
    """Decode, then the training decode's own conversion and resize policy (image_pixels, the card's `resize`),
    then the card's one normalisation -> [1, C, H, W]."""
    pixels = _decode_pixels(data, recipe)
    return np.ascontiguousarray(recipe.normalise(pixels.transpose(2, 0, 1)[None]))


def _decode_pixels(data: bytes, recipe: Preprocess) -> np.ndarray:
    """uint8 [H, W, C] as training decoded its images; the pixel count is checked from the header, before decoding."""
    if not data:
        raise ClientError(400, "request body is empty; send a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise ClientError(400, f"image of {image.width}x{image.height} pixels is too large to classify")
                return image_pixels(image, recipe.channels, (recipe.height, recipe.width), recipe.resize)
    except ClientError:
        raise
    except UnsupportedImage as error:
        raise ClientError(400, f"image cannot be classified: {error}") from None
    except UnidentifiedImageError:
        formats = ", ".join(IMAGE_FORMATS)
        raise ClientError(
            400, f"body is not a decodable image (unknown format; read: {formats}); send PNG or JPEG"
        ) from None
    except Exception as error:  # Pillow's decoders raise many types on hostile bytes: all are the client's
        raise ClientError(400, f"body is not a decodable image ({type(error).__name__})") from None


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """A Content-Type as ("type/subtype", {parameter: value}). The type and the parameter names are lower-cased, as
    they are case-insensitive (RFC 9110 section 8.3.1); values keep their case (a multipart boundary's matters),
    without the quotes of a quoted one."""
    kind, *parameters = content_type.split(";")  # a boundary cannot hold ';' (RFC 2046 section 5.1.1)
    named = {}
    for parameter in parameters:
        name, _, value = parameter.strip().partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        name = name.strip().lower()
        if name in named:  # which one the client meant would be a guess
            raise ClientError(400, f"Content-Type gives the parameter {name[:40]!r} more than once; give it once")
        named[name] = value
    return kind.strip().lower(), named


def is_multipart(content_type: str) -> bool:
    """Whether the body is a multipart form, whatever the letter case of its media type."""
    return media_type(content_type)[0].startswith("multipart/")


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The content of the first part of a multipart/form-data body that carries a filename (or the only part)."""
    boundary = media_type(content_type)[1].get("boundary")
    if not boundary:
        raise ClientError(400, "multipart body without a boundary in Content-Type")
    parts = [_split_part(raw) for raw in body.split(b"--" + boundary.encode("latin-1"))[1:-1]]
    files = [content for headers, content in parts if b"filename=" in headers.lower()]
    if files:
        return files[0]
    if len(parts) == 1:
        return parts[0][1]
    raise ClientError(400, "multipart body has no file part; send the image as a form field with a filename")


def _split_part(raw: bytes) -> tuple[bytes, bytes]:
    """A part is CRLF, headers, blank line, content, CRLF (RFC 7578); the closing CRLF belongs to the delimiter."""
    headers, separator, content = raw.partition(b"\r\n\r\n")
    if not separator:
        raise ClientError(400, "malformed multipart part (no blank line after its headers)")
    return headers, content[:-2] if content.endswith(b"\r\n") else content
