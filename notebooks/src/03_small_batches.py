# %% [markdown]
# # 03 · Small batches: BatchNorm, GhostBatchNorm, BatchRenorm, GroupNorm
#
# BatchNorm's training output depends on the other examples in the batch. With a
# large batch the batch statistics are close to the population statistics that
# evaluation uses; with 2 or 4 examples they are noisy, and the network learns to
# work with statistics it will never see at test time. The family offers three
# answers:
#
# | layer | statistics in training | fixes small batches by |
# |---|---|---|
# | `BatchNorm` | the batch | (nothing: the baseline) |
# | `GhostBatchNorm(virtual_batch_size=v)` | sub-batches of `v` examples | nothing either: it *sets* the noise level, for large batches |
# | `BatchRenorm` | the batch, corrected towards the running statistics (`r`, `d`) | making training use what evaluation uses |
# | `GroupNorm` | each example, groups of channels | not using the batch at all |
#
# This notebook trains the same MLP on scikit-learn's 8x8 digits with each of them
# (and with no normalization) at batch sizes from 2 to 64, with the pure functional
# API (no Flax). Each configuration trains 3 seeds side by side with `jax.vmap`.

# %%
import io
import time
from functools import partial

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits

import bn_jax

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from IPython.display import Image, display

x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32)
perm = np.random.default_rng(0).permutation(len(x))
x, y = jnp.asarray(x[perm]), jnp.asarray(y[perm].astype(np.int32))
x_test, y_test, x_train, y_train = x[:360], y[:360], x[360:], y[360:]
print("train", x_train.shape, "test", x_test.shape)

# %% [markdown]
# The model: `Dense(64) -> norm -> relu -> Dense(64) -> norm -> relu -> Dense(10)`,
# SGD with momentum 0.9, learning rate 0.05, 300 steps, momentum 0.9 for running
# statistics. Test accuracy is measured in evaluation mode (running statistics), which
# is where small-batch trouble shows.
#
# To compile each normalizer once, every step draws 64 examples and a `mask` keeps
# the first `B` of them: the masked rows take no part in the statistics (bn_jax pools
# statistics over valid elements only) nor in the loss, so this *is* training at batch
# size `B`, and the batch size becomes an array that `jax.vmap` can map over. Every
# batch size and normalizer sees the same examples in the same order for a given seed.

# %%
STEPS, LR, SEEDS, SIZES, MAX_BATCH = 300, 0.05, 3, (64, 64, 64, 10), 64
BATCHES = (2, 4, 8, 16, 64)
NAMES = ("none", "BatchNorm", "GhostBatchNorm", "BatchRenorm", "GroupNorm")


def make_norm(name):
    if name == "none":
        return None
    if name == "BatchNorm":
        return bn_jax.BatchNorm(momentum=0.9)
    if name == "GhostBatchNorm":  # virtual batches of 8: below 8 valid rows, one (masked) ghost batch
        return bn_jax.GhostBatchNorm(momentum=0.9, virtual_batch_size=8)
    if name == "BatchRenorm":  # the paper's ramp: plain BatchNorm first, then rmax 3, dmax 5
        ramp = STEPS // 4
        return bn_jax.BatchRenorm(
            momentum=0.9, rmax=optax.linear_schedule(1.0, 3.0, ramp), dmax=optax.linear_schedule(0.0, 5.0, ramp)
        )
    if name == "GroupNorm":
        return bn_jax.GroupNorm(num_groups=8)
    raise ValueError(name)


def init(seed, norm):
    """Weights from NumPy (the same for every normalizer), normalizer params and state."""
    rng = np.random.default_rng(seed)
    params, state = [], []
    for n_in, n_out in zip(SIZES[:-1], SIZES[1:]):
        w = rng.normal(size=(n_in, n_out)).astype(np.float32) * np.sqrt(2.0 / n_in)
        layer, s = {"w": jnp.asarray(w), "b": jnp.zeros(n_out)}, {}
        if norm is not None and n_out != SIZES[-1]:
            layer["norm"], s = norm.init(n_out)
        params.append(layer)
        state.append(s)
    return params, state


def forward(norm, params, state, h, training, mask=None):
    new_state = []
    for i, (layer, s) in enumerate(zip(params, state)):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            if norm is not None:
                m = None if isinstance(norm, bn_jax.GroupNorm) else mask  # GroupNorm: per example
                h, s = norm.apply(layer["norm"], s, h, training=training, mask=m)
            h = jax.nn.relu(h)
        new_state.append(s)
    return h, new_state


# The batches: for each seed, STEPS draws of MAX_BATCH training indices (NumPy, so the
# compiled program holds no random-number generator).
ORDER = np.stack(
    [np.random.default_rng(100 + s).integers(0, len(x_train), (STEPS, MAX_BATCH)) for s in range(SEEDS)]
)


def train(name):
    """Test accuracy (eval mode), shape [batch size, seed]."""
    norm = make_norm(name)
    tx = optax.sgd(LR, momentum=0.9)

    def run(params, state, idx, batch):
        valid = jnp.arange(MAX_BATCH) < batch

        def step(carry, i):
            params, state, opt = carry

            def loss_fn(params):
                logits, new_state = forward(norm, params, state, x_train[i], True, valid[:, None])
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_train[i])
                return jnp.sum(jnp.where(valid, ce, 0.0)) / batch, new_state

            (_, state), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(g, opt)
            return (optax.apply_updates(params, updates), state, opt), None

        (params, state, _), _ = jax.lax.scan(step, (params, state, tx.init(params)), idx)
        logits, _ = forward(norm, params, state, x_test, False)
        return jnp.mean(jnp.argmax(logits, -1) == y_test)

    inits = [init(seed, norm) for seed in range(SEEDS)]
    params, state = jax.tree.map(lambda *a: jnp.stack(a), *inits)  # leading seed axis
    over_seeds = jax.vmap(run, in_axes=(0, 0, 0, None))
    over_batches = jax.vmap(over_seeds, in_axes=(None, None, None, 0))
    return np.asarray(jax.jit(over_batches)(params, state, ORDER, jnp.asarray(BATCHES)))


start = time.perf_counter()
acc = {name: train(name) for name in NAMES}  # [batch, seed]
print(f"{len(NAMES)} normalizers x {len(BATCHES)} batch sizes x {SEEDS} seeds in {time.perf_counter() - start:.1f} s")

# %%
print("test accuracy, mean over 3 seeds (min-max)\n")
print(f"{'batch size':>16s} " + " ".join(f"{b:>15d}" for b in BATCHES))
for name in NAMES:
    cells = [f"{a.mean():.3f} ({a.min():.2f}-{a.max():.2f})" for a in acc[name]]
    print(f"{name:>16s} " + " ".join(f"{c:>15s}" for c in cells))

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=70)
for name in NAMES:
    m = acc[name].mean(1)
    ax.plot(BATCHES, m, "o-", label=name)
    ax.fill_between(BATCHES, acc[name].min(1), acc[name].max(1), alpha=0.15)
ax.set_xscale("log", base=2)
ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
ax.set_xlabel("batch size")
ax.set_ylabel("test accuracy (eval mode)")
ax.set_title(f"digits MLP, {STEPS} SGD steps, {SEEDS} seeds (band: min-max)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
buf = io.BytesIO()
fig.savefig(buf, format="png")
plt.close(fig)
display(Image(data=buf.getvalue()))

# %% [markdown]
# ## Why BatchNorm suffers at batch 2: training and evaluation disagree
#
# The accuracy gap comes from the mismatch between the statistics a BatchNorm layer
# normalizes with in training (this batch's) and in evaluation (the running ones).
# Measured directly on one layer: with running statistics equal to the population
# statistics (what they converge to), feed batches of size `B` and compare the
# training-mode output with the evaluation-mode output.

# %%
feat = x_train @ jax.random.normal(jax.random.key(1), (64, 16))  # a fixed layer's pre-activations
bn = bn_jax.BatchNorm()
rn = bn_jax.BatchRenorm(rmax=3.0, dmax=5.0)


@partial(jax.jit, static_argnums=0)
def train_eval_gap(layer, xb):
    """Mean |training-mode output - eval-mode output| over a stack of batches."""
    params, state = layer.init(16)
    state = {**state, "mean": feat.mean(0), "var": feat.var(0)}  # converged running statistics

    def one(xb):
        y_train_mode, _ = layer.apply(params, state, xb, training=True)
        y_eval_mode, _ = layer.apply(params, state, xb, training=False)
        return jnp.abs(y_train_mode - y_eval_mode).mean()

    return jax.vmap(one)(xb).mean()


rng = np.random.default_rng(0)
print("batch | mean |train - eval| output:  BatchNorm   BatchRenorm(rmax=3, dmax=5)")
for b in BATCHES:
    xb = feat[np.stack([rng.choice(len(feat), b, replace=False) for _ in range(50)])]  # 50 batches
    print(f"{b:5d} | {float(train_eval_gap(bn, xb)):34.3f} {float(train_eval_gap(rn, xb)):13.3f}")

# %% [markdown]
# For BatchNorm the gap shrinks roughly like `1/sqrt(B)`: at batch 2 the training
# output is far from what evaluation will produce. Batch Renorm's `r` and `d`
# correct the batch statistics towards the running ones, so within the clipping
# range its training output *is* the evaluation output (the gap is zero up to rounding
# when nothing is clipped, and small when it is), while the gradient still flows
# through the batch statistics.
#
# **Reading the results.**
#
# * Compare the normalizers at the same batch size: the learning rate and the
#   number of steps are fixed, so larger batches also see more data.
# * GhostBatchNorm with `virtual_batch_size=8` is BatchNorm up to batch 8 and
#   normalizes in groups of 8 above (its curve hides BatchNorm's up to 8): its
#   statistics are as noisy as BatchNorm's at batch 8 whatever the batch. It is a tool for large batches (restoring the
#   regularizing noise of small ones), not a fix for small batches.
# * GroupNorm does not look at the batch, so its result does not depend on the batch
#   size through the statistics at all (it still sees fewer examples per step, and
#   noisier gradients, at small batches). BatchRenorm keeps BatchNorm's behaviour at
#   large batches and removes most of the train/eval mismatch at small ones.
# * At batch 2 with 300 steps every model has seen only 600 examples and all of them
#   are poor: the ranking at batch 2 says little (3 seeds, wide spreads).
# * These are measurements of one small MLP on one small data set with 3 seeds: they
#   show the mechanisms, not a ranking for your model.
