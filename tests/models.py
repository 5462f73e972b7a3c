"""Standard architectures written with plain ``flax.linen`` / ``flax.nnx``, for tests.

A ResNet-18 in the style of Flax's ImageNet example (stem conv 7x7/2, max
pool, four stages of two basic blocks, projection shortcuts, global average
pool, dense head) and a small pre-LN transformer (token embedding, blocks of
norm -> self-attention -> residual, norm -> MLP -> residual, final norm).
They use no bn_jax code: the norm layer classes are fields (Flax's by
default), so a test can build the same model with Flax's layers, with bn_jax's
drop-ins, or with Flax's layers under ``bn_jax.linen.patch`` /
``bn_jax.nnx.convert``. Widths are tiny so that they compile fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

# ---------------------------------------------------------------- flax.linen


class ResNetBlock(nn.Module):
    """Basic residual block: two 3x3 convs with norms, projection when the shape changes."""

    filters: int
    norm: Callable[..., nn.Module]
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False)
        y = conv(self.filters, (3, 3), self.strides)(x)
        y = nn.relu(self.norm()(y))
        y = conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if x.shape != y.shape:
            x = conv(self.filters, (1, 1), self.strides, name="conv_proj")(x)
            x = self.norm(name="norm_proj")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 for NHWC images; ``norm_cls`` is the BatchNorm class to use."""

    num_classes: int = 5
    num_filters: int = 4
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    norm_cls: Any = nn.BatchNorm
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        norm = functools.partial(
            self.norm_cls,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            axis_name=self.axis_name,
        )
        x = nn.Conv(
            self.num_filters,
            (7, 7),
            (2, 2),
            padding=[(3, 3), (3, 3)],
            use_bias=False,
            name="conv_init",
        )(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, norm, strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(norm(x)), then x + mlp(norm(x))."""

    heads: int
    norm_cls: Any

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        width = x.shape[-1]
        h = self.norm_cls()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
        h = self.norm_cls()(x)
        h = nn.Dense(width)(nn.gelu(nn.Dense(2 * width)(h)))
        return x + h


class Transformer(nn.Module):
    """Small pre-LN transformer over integer tokens; ``norm_cls`` for every norm."""

    vocab: int = 11
    width: int = 8
    heads: int = 2
    layers: int = 2
    norm_cls: Any = nn.LayerNorm

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = nn.Embed(self.vocab, self.width)(tokens)
        attn_mask = None if mask is None else nn.make_attention_mask(mask, mask)
        for _ in range(self.layers):
            x = TransformerBlock(self.heads, self.norm_cls)(x, attn_mask)
        x = self.norm_cls()(x)
        return nn.Dense(self.vocab)(x)


# ------------------------------------------------------------------ flax.nnx


class NNXResNetBlock(nnx.Module):
    def __init__(self, cin: int, filters: int, strides: int, norm: Callable, *, rngs: nnx.Rngs):
        s = (strides, strides)
        self.conv1 = nnx.Conv(cin, filters, (3, 3), s, use_bias=False, rngs=rngs)
        self.norm1 = norm(filters, rngs=rngs)
        self.conv2 = nnx.Conv(filters, filters, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = norm(filters, scale_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.projected = strides != 1 or cin != filters
        if self.projected:
            self.conv_proj = nnx.Conv(cin, filters, (1, 1), s, use_bias=False, rngs=rngs)
            self.norm_proj = norm(filters, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.projected:
            x = self.norm_proj(self.conv_proj(x))
        return nnx.relu(x + y)


class NNXResNet18(nnx.Module):
    """ResNet-18 as an nnx Module; ``norm_cls(num_features, ..., rngs=...)``."""

    def __init__(
        self,
        *,
        num_classes: int = 5,
        num_filters: int = 4,
        norm_cls: Any = nnx.BatchNorm,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        norm = functools.partial(norm_cls, momentum=0.9, epsilon=1e-5, axis_name=axis_name)
        self.conv_init = nnx.Conv(
            3, num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False, rngs=rngs
        )
        self.bn_init = norm(num_filters, rngs=rngs)
        blocks, cin = [], num_filters
        for i in range(4):
            for j in range(2):
                filters = num_filters * 2**i
                blocks.append(
                    NNXResNetBlock(cin, filters, 2 if i > 0 and j == 0 else 1, norm, rngs=rngs)
                )
                cin = filters
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn_init(self.conv_init(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


class NNXTransformerBlock(nnx.Module):
    def __init__(self, width: int, heads: int, norm_cls: Any, *, rngs: nnx.Rngs):
        self.norm1 = norm_cls(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
        self.norm2 = norm_cls(width, rngs=rngs)
        self.up = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        h = self.norm1(x)
        x = x + self.attn(h, h, mask=mask)
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class NNXTransformer(nnx.Module):
    """Small pre-LN transformer as an nnx Module."""

    def __init__(
        self,
        *,
        vocab: int = 11,
        width: int = 8,
        heads: int = 2,
        layers: int = 2,
        norm_cls: Any = nnx.LayerNorm,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.blocks = nnx.List(
            [NNXTransformerBlock(width, heads, norm_cls, rngs=rngs) for _ in range(layers)]
        )
        self.norm = norm_cls(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = self.embed(tokens)
        attn_mask = None if mask is None else nnx.make_attention_mask(mask, mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.head(self.norm(x))
