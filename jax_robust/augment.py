"""Training-set augmentation on the device, with explicit keys (inside the jitted step).

  crop_flip  zero-pad `padding` pixels, random crop back to the input size, horizontal flip
             with probability 1/2: the official CIFAR-10 `aug01` (RandomCrop(32, padding=4),
             RandomHorizontalFlip).
  crop       the same without the flip: the official Restricted ImageNet train transform's
             RandomCrop(64, padding=8) (applied here to the stored 72x72 centre crop).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "crop_flip", "crop")
# The official augmentation of each data set (docs/official_code.md, section 2).
OFFICIAL_AUGMENTATION = {"cifar10": "crop_flip", "restricted_imagenet": "crop"}


def random_crop(x: jax.Array, key: jax.Array, out_hw: tuple[int, int], padding: int) -> jax.Array:
    """Per-example random crop of size out_hw from x [B, H, W, C] zero-padded by `padding`."""
    b = x.shape[0]
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    max_y = padded.shape[1] - out_hw[0]
    max_x = padded.shape[2] - out_hw[1]
    ky, kx = jax.random.split(key)
    oy = jax.random.randint(ky, (b,), 0, max_y + 1)
    ox = jax.random.randint(kx, (b,), 0, max_x + 1)

    def crop_one(img, y0, x0):
        return jax.lax.dynamic_slice(img, (y0, x0, 0), (*out_hw, img.shape[-1]))

    return jax.vmap(crop_one)(padded, oy, ox)


def random_flip(x: jax.Array, key: jax.Array) -> jax.Array:
    """Flips each image of x [B, H, W, C] left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1], x)


def center_crop(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """The central out_hw window of x [B, H, W, C] (x itself if it is that size)."""
    h, w = x.shape[1:3]
    top, left = (h - out_hw[0]) // 2, (w - out_hw[1]) // 2
    return x[:, top:top + out_hw[0], left:left + out_hw[1]]


def augment(x: jax.Array, key: jax.Array, kind: str, out_hw: tuple[int, int] | None = None,
            padding: int | None = None) -> jax.Array:
    """Applies augmentation `kind` to a batch, giving images of `out_hw` (default: the
    input's size; 'none' centre-crops to it)."""
    out_hw = tuple(x.shape[1:3]) if out_hw is None else tuple(out_hw)
    if kind == "none":
        return center_crop(x, out_hw)
    if padding is None:
        padding = 4 if kind == "crop_flip" else 8
    crop_key, flip_key = jax.random.split(key)
    x = random_crop(x, crop_key, out_hw, padding)
    if kind == "crop_flip":
        x = random_flip(x, flip_key)
    return x
