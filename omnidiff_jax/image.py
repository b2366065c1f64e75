"""Images <-> MAGVIT-v2 codes: the reference preprocessing (PIL), batched jitted encode/decode, PNG output.

Preprocessing is the reference's torchvision `image_transform` (Omni-Diffusion `image_processor.py`), done with PIL
on the host because token parity depends on PIL's antialiased uint8 bicubic: convert to RGB (`to_rgb`, which
scales deep grayscale and composites transparency on white where the reference clips or drops it), resize the
shorter side to `size` (the longer to int(size * long / short)), center crop with Python's banker's rounding of
the offsets, scale to [-1, 1]. Omni-Diffusion tokenizes user images at 512 (1024 codes) and generated images at
256 (256 codes). Postprocessing is the reference's clamp((x + 1) / 2, 0, 1) * 255 truncated to uint8, kept in
RGB (the reference's BGR is only for cv2.imwrite).

`ImageTokenizer` holds a `Magvit` and its parameters, loaded from the reference `pytorch_model.safetensors`
(file or folder) or from our orbax folder, and runs `encode_images` / `decode_codes` jitted; given a mesh the
parameters are replicated and the batch is split over its data x fsdp axes (padded to a multiple).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from PIL import Image

from omnidiff_jax import sharding
from omnidiff_jax.convert import orbax_io
from omnidiff_jax.convert.keymap import flatten, unflatten
from omnidiff_jax.convert.magvit import config_from_source, magvit_keymap, open_checkpoint, save_reference
from omnidiff_jax.convert.sources import CheckpointError
from omnidiff_jax.files import atomic_write
from omnidiff_jax.models import abstract_params
from omnidiff_jax.models.magvit import CODEBOOK_SIZE, Magvit, MagvitConfig

SIZES = (256, 512)  # generated / assistant images, user images
ORBAX_KEY = "magvit"  # parameter group and metadata field in our orbax checkpoint folder


class ImageError(ValueError):
    """An image file, pixel array or code array that cannot be used; the message names it and the problem."""


# ------------------------------------------------------------------------------------------------ host side

def read_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image file as RGB (`to_rgb`: every PIL mode, scaled or composited on white)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated files fail here
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB.

    Grayscale deeper than 8 bits is scaled to 0..255, not clipped as PIL's `convert("RGB")` does: 16-bit modes
    (I;16, I;16B, ...) and 32-bit integers (I) within 0..65535 by 255 / 65535, other 32-bit integers and floats
    (F) from their minimum..maximum, except floats within 0..1, by 255. Transparency (RGBA, LA, PA, a palette or
    colour key with transparency) is composited on white. CMYK, palettes, 1-bit and the rest convert as PIL does.
    The reference's plain `convert("RGB")` gives the same pixels for RGB, L, 1, P and CMYK images.
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(image)), "L").convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), np.int64)  # [H, W, 4]
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        white = (rgb * alpha + 255 * (255 - alpha) + 127) // 255  # round to nearest (no ties exist)
        return Image.fromarray(white.astype(np.uint8), "RGB")
    return image.convert("RGB")


def _gray_to_uint8(gray: np.ndarray) -> np.ndarray:
    """16/32-bit integer or float grayscale [H, W] -> uint8 [H, W] (see `to_rgb` for the scaling)."""
    values = np.nan_to_num(gray.astype(np.float64))
    lo, hi = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if np.issubdtype(gray.dtype, np.integer) and lo >= 0 and hi <= 65535:
        scaled = values * (255 / 65535)
    elif np.issubdtype(gray.dtype, np.floating) and lo >= 0 and hi <= 1:
        scaled = values * 255
    else:
        scaled = (values - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.rint(scaled).astype(np.uint8)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> float32 [size, size, 3] in [-1, 1]: bicubic shorter-side resize, center crop, scale."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size[0] * new_size[1] > Image.MAX_IMAGE_PIXELS:
        raise ImageError(f"a {width}x{height} image resized to shorter side {size} would be {new_size[0]}x"
                         f"{new_size[1]}, over PIL's {Image.MAX_IMAGE_PIXELS}-pixel limit")
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = int(round((new_size[0] - size) / 2))  # round() is banker's rounding, as in torchvision
    top = int(round((new_size[1] - size) / 2))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
    return (pixels / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """`preprocess(read_image(path), size)`: float32 [size, size, 3] in [-1, 1]."""
    return preprocess(read_image(path), size)


def to_uint8(pixels) -> np.ndarray:
    """Decoder output in [-1, 1] -> uint8 RGB: clamp((x + 1) / 2, 0, 1) * 255, truncated as the reference."""
    pixels = np.asarray(pixels, dtype=np.float32)
    return (np.clip((pixels + 1) / 2, 0, 1) * 255).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray, overwrite: bool = False) -> None:
    """Writes a uint8 [H, W, 3] RGB array as PNG (via a temporary sibling and a rename)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ImageError(f"{path}: expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    with atomic_write(path, overwrite) as tmp:
        Image.fromarray(image, "RGB").save(tmp, format="PNG")


def check_codes(codes, name: str = "codes") -> np.ndarray:
    """Validates codes [N] or [B, N] (integers in [0, 8192), N a non-zero perfect square); returns [B, N] int32."""
    arr = np.asarray(codes)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ImageError(f"{name} must have shape [N] or [batch, N], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ImageError(f"{name} must be integers, got dtype {arr.dtype}")
    side = math.isqrt(arr.shape[1])
    if arr.shape[1] == 0 or side * side != arr.shape[1]:
        raise ImageError(f"{name}: {arr.shape[1]} codes per image is not a square grid (16x16 = 256 for a "
                         "256-pixel image, 32x32 = 1024 for 512)")
    bad = np.argwhere((arr < 0) | (arr >= CODEBOOK_SIZE))
    if bad.size:
        b, t = bad[0]
        raise ImageError(f"{name}[{b}, {t}] = {arr[b, t]} is outside the codebook [0, {CODEBOOK_SIZE}) "
                         f"({len(bad)} such value(s))")
    return arr.astype(np.int32)


# ------------------------------------------------------------------------------------------------ the tokenizer

def magvit_target(config: MagvitConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the MAGVIT-v2 parameters, without allocating anything."""
    f = config.downsample_factor
    return flatten(abstract_params(Magvit(config), jnp.zeros((1, f, f, 3), jnp.float32)))


@dataclasses.dataclass
class ImageTokenizer:
    """A MAGVIT-v2 with parameters. `params` is a nested dict of float32 arrays (replicated over `mesh`)."""

    config: MagvitConfig
    params: dict
    mesh: Mesh | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, mesh: Mesh | None = None) -> "ImageTokenizer":
        """Loads a reference checkpoint (`pytorch_model.safetensors`, its folder, or a .pt/.bin) or our orbax folder.

        The architecture is read off the tensor shapes (or the orbax folder's metadata); every key and shape is
        checked. Parameters land replicated on `mesh`, or on the default device.
        """
        place = NamedSharding(mesh, PartitionSpec()) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        if orbax_io.is_checkpoint(path):
            meta = orbax_io.read_meta(path)
            if ORBAX_KEY not in meta:
                raise CheckpointError(f"{path}: an omnidiff checkpoint without a MAGVIT-v2 ({ORBAX_KEY!r} metadata)")
            config = MagvitConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta[ORBAX_KEY].items()})
            target = {f"{ORBAX_KEY}/{k}": jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=place)
                      for k, v in magvit_target(config).items()}
            return cls(config, unflatten(orbax_io.restore(path, target))[ORBAX_KEY], mesh)
        source = open_checkpoint(path)
        config = config_from_source(source)
        target = magvit_target(config)
        params = magvit_keymap().load(source, target, dtype=np.float32, shardings={k: place for k in target})
        return cls(config, params, mesh)

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> None:
        """Writes our orbax checkpoint folder (convert.orbax_io: parameters plus the config), atomically."""
        with orbax_io.writing(folder, force=overwrite) as checkpoint:
            checkpoint.add_params({ORBAX_KEY: jax.device_get(self.params)})
            checkpoint.meta[ORBAX_KEY] = dataclasses.asdict(self.config)

    def export(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Writes the reference `pytorch_model.safetensors` (path: a .safetensors file or a folder)."""
        return save_reference(self.params, path, overwrite)

    # ------------------------------------------------------------------------------------------ compute

    @functools.cached_property
    def _jitted(self) -> dict:
        module, mesh = Magvit(self.config), self.mesh

        def apply(params, x, method, *args):
            with sharding.activate(mesh):
                return module.apply({"params": params}, x, *args, method=method)

        return {"latents": jax.jit(lambda params, x: apply(params, x, Magvit.latents)),
                "encode": jax.jit(lambda params, x: apply(params, x, Magvit.encode)),
                "decode": jax.jit(lambda params, c: apply(params, c, Magvit.decode, *[math.isqrt(c.shape[-1])] * 2))}

    def _batched(self, name: str, x: np.ndarray) -> np.ndarray:
        """Runs a jitted method on a batch, padded to a multiple of the mesh's data-parallel size and sharded."""
        batch = x.shape[0]
        if self.mesh is not None:
            shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            x = np.concatenate([x, np.zeros((-batch % shards, *x.shape[1:]), x.dtype)])
            x = jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))
        return np.asarray(self._jitted[name](self.params, x))[:batch]

    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 3:
            images = images[None]
        f = self.config.downsample_factor
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % f or images.shape[2] % f or not (
                images.shape[1] and images.shape[2]):
            raise ImageError(f"images must be [batch, H, W, 3] with H and W non-zero multiples of {f}, "
                             f"got shape {images.shape}")
        return images

    def encode_images(self, images) -> np.ndarray:
        """images [B, H, W, 3] (or [H, W, 3]) in [-1, 1] -> codes [B, (H/16) * (W/16)] int32, row-major."""
        return self._batched("encode", self._check_images(images))

    def latents(self, images) -> np.ndarray:
        """images [B, H, W, 3] in [-1, 1] -> encoder latents z [B, H/16, W/16, 13] float32 (before LFQ)."""
        return self._batched("latents", self._check_images(images))

    def decode_codes(self, codes) -> np.ndarray:
        """codes [B, N] (or [N]), N a square -> images [B, 16 sqrt(N), 16 sqrt(N), 3] float32, raw decoder output."""
        return self._batched("decode", check_codes(codes))

    def encode_files(self, paths: Sequence[str | os.PathLike], size: int) -> np.ndarray:
        """Reads, preprocesses at `size` (256 or 512) and encodes image files as one batch: codes [B, (size/16)^2]."""
        if size not in SIZES:
            raise ImageError(f"size must be one of {SIZES} (Omni-Diffusion's resolutions), got {size}")
        return self.encode_images(np.stack([load_image(p, size) for p in paths]))
