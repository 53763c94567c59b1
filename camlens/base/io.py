"""Reading images: paths, PIL images and arrays to RGB uint8 arrays, with clear errors.

Grayscale, RGBA, palette and 16-bit images are converted to 8-bit RGB. Images above
:data:`MAX_PIXELS` pixels are refused (decompression-bomb guard) instead of being decoded.

**EXIF orientation is applied** (files and PIL images): a JPEG whose EXIF ``Orientation`` tag says
"rotate 90°" (e.g. a phone photo taken upright) is returned upright, as every image viewer shows it,
so maps, overlays and boxes are in the displayed frame and ``image_size`` in the JSON outputs is the
displayed ``[height, width]``.

**Decode only what the model sees.** :func:`decode_image` with ``fit=`` (what
:func:`camlens.explain` and the dataset pipeline pass: the preprocessing's
:meth:`~camlens.models.preprocess.Preprocess.min_decode_size`) decodes a JPEG larger than needed at
1/2, 1/4 or 1/8 scale in the DCT domain (PIL's ``Image.draft``: the largest reduction whose result
still covers the size the preprocessing resizes to; a 4032x3024 phone photo for a 224x224 model
decodes at 504x378 in a fraction of the time) and other formats are box-reduced by an integer
factor that keeps twice the size needed (``Image.reduce``) before the resize. The original
(upright) size comes from the header, so maps and boxes stay in the photo's pixels. The
preprocessed tensor differs from a full decode's by resampling only (bounded by
:data:`SCALED_DECODE_MAD`, held by ``tests/base/test_scaled_decode.py``); ``exact_decode=True`` decodes
in full.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from camlens.base.errors import ImageLoadError, InputError, NonFiniteError

#: file suffixes read as images when a folder or a glob is expanded (the CLI, the dataset pipeline
#: and ImageFolder training data all use this list)
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".ico",
)

ImageLike = str | os.PathLike | Image.Image | np.ndarray

#: Largest image accepted, in pixels (about 16k x 16k). PIL's own bomb guard is kept below it.
MAX_PIXELS = 16384 * 16384

#: ``fit``: the upright original ``(H, W)`` -> the smallest ``(H, W)`` the decoded image must cover
#: (``None``: decode in full), e.g. :meth:`camlens.models.preprocess.Preprocess.min_decode_size`
FitSize = Callable[[tuple[int, int]], "tuple[int, int] | None"]

#: The bound a scaled decode's preprocessed tensor keeps to a full decode's: mean absolute
#: difference in [0, 1] pixel units (the bundled photos upscaled to 4032x3024 JPEGs, quality 90;
#: measured by ``python -m benchmarks.decode``, held by ``tests/base/test_scaled_decode.py``)
SCALED_DECODE_MAD = 0.01

#: EXIF orientations 5-8 swap width and height
_SWAPS = (5, 6, 7, 8)


@dataclass(frozen=True)
class Decoded:
    """An image as decoded for a model: ``rgb`` (``(h, w, 3)`` uint8, upright; smaller than the
    photo after a scaled decode) and ``size``, the photo's own upright ``(H, W)``."""

    rgb: np.ndarray
    size: tuple[int, int]

    @property
    def reduced(self) -> bool:
        """Whether ``rgb`` is smaller than the photo (a scaled decode)."""
        return tuple(self.rgb.shape[:2]) != tuple(self.size)


def _check_values(arr: np.ndarray) -> None:
    """Refuse what has no meaning as pixel values: complex or non-numeric arrays, NaN or Inf,
    negative signed integers (an image is uint8 0..255, uint16 0..65535 or floats in [0, 1])."""
    if arr.dtype == np.bool_:
        return
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(
            f"image array has complex dtype {arr.dtype}: pass real pixel values (e.g. np.abs(arr) or arr.real, "
            "scaled to [0, 1] or uint8)"
        )
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"image array has dtype {arr.dtype}; pass uint8 in [0, 255], uint16, or floats in [0, 1]")
    if np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise NonFiniteError(
            f"the input image array holds {bad} NaN or Inf value(s) of {arr.size}: its pixels have no value to "
            "explain; clean it first (e.g. np.nan_to_num(arr, nan=0.0)) or drop the image"
        )
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
        raise InputError(
            f"image array of dtype {arr.dtype} has negative values (min {int(arr.min())}): pixel values are "
            "0..255 (uint8) or 0..65535 (uint16); shift or rescale it, e.g. (arr - arr.min()) to uint8, "
            "or pass floats in [0, 1]"
        )


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    _check_values(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16 or (np.issubdtype(arr.dtype, np.integer) and arr.max(initial=0) > 255):
        return (arr.astype(np.float64) / 65535.0 * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < -1e-6 or np.nanmax(arr) > 1.0 + 1e-6):
            raise InputError(
                f"float image array has values in [{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}]; "
                "pass floats in [0, 1] or uint8 in [0, 255] (or a preprocessed tensor)"
            )
        return (arr * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    return arr.clip(0, 255).astype(np.uint8)


def array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Return an ``(H, W, 3)`` uint8 RGB copy of a grayscale / RGB / RGBA image array."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise InputError(
            f"an image array must be HxW, HxWx1, HxWx3 or HxWx4 (channels last); got shape {arr.shape}. "
            "For a CHW tensor pass a torch tensor of shape (N, C, H, W) instead."
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"empty image of shape {arr.shape}")
    return np.ascontiguousarray(_to_uint8(arr))


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any PIL image mode (L, LA, P, RGBA, I;16, I, F, CMYK…) to an RGB uint8 array, upright
    (its EXIF orientation applied)."""
    if img.getexif().get(0x0112, 1) != 1:  # Orientation: 1 = as stored
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return array_to_rgb((arr / hi).clip(0, 1))
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        return array_to_rgb((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr))
    if img.mode in ("P", "PA", "LA", "RGBA") and img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)


def _pil_image(img: Image.Image) -> np.ndarray:
    """:func:`pil_to_rgb` of an image the caller opened: an empty, closed or truncated one is an
    :class:`ImageLoadError`, not PIL's raw exception."""
    name = getattr(img, "filename", "") or f"a PIL {img.mode} image"
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError(f"{name} is empty ({w}x{h} pixels): there is nothing to explain")
    try:
        if w * h > MAX_PIXELS:
            raise ImageLoadError(
                f"{name}: {w}x{h} pixels is larger than the {MAX_PIXELS:,}-pixel limit; downscale it first"
            )
        img.load()
        return pil_to_rgb(img)
    except (InputError, ImageLoadError):
        raise
    except ValueError as exc:  # PIL: "Operation on closed image"
        if "closed" in str(exc):
            raise ImageLoadError(
                f"{name} is closed (its file was released by .close() or a finished `with Image.open(...)` "
                "block): pass the path, keep the image open, or pass img.copy() made before closing it"
            ) from None
        raise ImageLoadError(f"{name}: cannot decode image ({exc})") from None
    except (OSError, SyntaxError) as exc:
        raise ImageLoadError(
            f"{name}: cannot decode image ({exc}); the file may be truncated or corrupt. Re-save it, or set "
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True to accept a partial image"
        ) from None


def load_image(source: ImageLike) -> np.ndarray:
    """Load one image as an ``(H, W, 3)`` uint8 RGB array, decoded in full.

    Raises :class:`~camlens.base.errors.ImageLoadError` naming the file for missing, unreadable,
    corrupt, unsupported or oversized images.
    """
    return decode_image(source).rgb


def decode_image(source: ImageLike, fit: FitSize | None = None) -> Decoded:
    """Decode one image for a model: with ``fit`` (see :data:`FitSize`), a file larger than needed is
    decoded reduced (JPEG: DCT-domain scaling by 1/2, 1/4 or 1/8 via ``Image.draft``; other formats:
    ``Image.reduce`` by the largest integer factor that keeps twice ``fit``'s size), EXIF
    orientation applied; ``size`` is the photo's own upright ``(H, W)`` from its header. PIL images
    and arrays the caller passes are never reduced (nothing to save; the caller's image is untouched).
    """
    if isinstance(source, np.ndarray):
        rgb = array_to_rgb(source)
        return Decoded(rgb, (int(rgb.shape[0]), int(rgb.shape[1])))
    if isinstance(source, Image.Image):
        rgb = _pil_image(source)
        return Decoded(rgb, (int(rgb.shape[0]), int(rgb.shape[1])))
    if isinstance(source, (str, os.PathLike)):
        return _decode_file(Path(source), fit)
    raise InputError(
        f"cannot use {type(source).__name__} as an image: pass a path, a PIL image, an HxWx3 array, "
        "a list of those, or a preprocessed (N, C, H, W) tensor"
    )


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """An image file's upright ``(H, W)`` from its header (EXIF orientation applied), nothing decoded.
    Raises :class:`~camlens.base.errors.ImageLoadError` naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (w, h) if img.getexif().get(0x0112, 1) in _SWAPS else (h, w)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{path}: cannot read the image's size ({exc})") from None


def _decode_file(path: Path, fit: FitSize | None) -> Decoded:
    if not path.exists():
        raise ImageLoadError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageLoadError(f"{path} is a folder, not an image (the CLI expands folders)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageLoadError(
                        f"{path}: {w}x{h} pixels is larger than the {MAX_PIXELS:,}-pixel limit "
                        "(possible decompression bomb); downscale it first"
                    )
                swap = img.getexif().get(0x0112, 1) in _SWAPS
                size = (w, h) if swap else (h, w)  # upright (H, W)
                need = fit(size) if fit is not None else None
                if need is None:
                    img.load()
                    return Decoded(pil_to_rgb(img), size)
                stored = (need[1], need[0]) if swap else need  # (H, W) in the file's own frame
                return Decoded(pil_to_rgb(_reduced(img, stored)), size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            f"{path}: image is too large to decode safely (possible decompression bomb): {exc}"
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file camlens can read (corrupt or unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{path}: cannot decode image ({exc}); the file may be truncated") from None


#: modes ``Image.reduce`` takes (others are decoded in full: palette, 16-bit, CMYK…)
_REDUCIBLE = ("L", "LA", "RGB", "RGBA")


def _reduced(img: Image.Image, need: tuple[int, int]) -> Image.Image:
    """``img`` decoded at the smallest size that still covers ``need`` ``(H, W)`` (stored frame):
    a JPEG at 1/2, 1/4 or 1/8 scale (PIL's draft picks the largest scale whose result is at least
    ``need``), another format box-reduced after a full decode by the largest integer factor that
    keeps **twice** ``need`` (a box filter right down to the input size differs from the antialiased
    resize: on a 4032x3024 PNG for 224x224, mean difference 0.011 at factor 13, 0.0005 at factor 6).
    The EXIF data stays with the result (:func:`pil_to_rgb` applies the orientation)."""
    w, h = img.size
    nh, nw = max(1, int(need[0])), max(1, int(need[1]))
    if img.format == "JPEG":
        img.draft("RGB", (nw, nh))
        img.load()
        return img
    img.load()
    factor = min(w // (2 * nw), h // (2 * nh))
    if factor < 2 or img.mode not in _REDUCIBLE:
        return img
    return img.reduce(factor)  # keeps img.info (the EXIF orientation)


def load_images(sources: ImageLike | Sequence[ImageLike]) -> list[np.ndarray]:
    """Load one image or a list of images, decoded in full; see :func:`load_image`."""
    return [d.rgb for d in decode_images(sources)]


def decode_images(sources: ImageLike | Sequence[ImageLike], fit: FitSize | None = None) -> list[Decoded]:
    """Decode one image or a list of images for a model; see :func:`decode_image`."""
    if isinstance(sources, (list, tuple)):
        if not sources:
            raise InputError("empty list of images")
        return [decode_image(s, fit) for s in sources]
    return [decode_image(sources, fit)]  # type: ignore[arg-type]  # one image (a str is not a list here)


def sample_image(name: str = "chelsea") -> np.ndarray:
    """A real photo bundled with scikit-image (``chelsea`` the cat, ``coffee``, ``astronaut``, …)."""
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if fn is None or not callable(fn):
        raise InputError(f"no bundled photo named {name!r}; try 'chelsea', 'coffee', 'astronaut', 'rocket'")
    return array_to_rgb(fn())
