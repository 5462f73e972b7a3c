# %% [markdown]
# # 04 · Inference: folding and recalibration
#
# At inference BatchNorm is a fixed per-channel affine map,
# `y = (z - mean) * scale / sqrt(var + eps) + bias`. Two tools follow from that:
#
# * **Folding**: merge that map into the convolution or dense layer before it, so the
#   deployed model has no BatchNorm left to run (`bn_jax.fold_into_conv`,
#   `fold_into_dense`, and `fold_batch_norms` for a whole Flax variable tree).
# * **Recalibration**: replace the running statistics, an exponential average taken
#   while the weights were still moving, by the exact mean and variance of the layer
#   inputs over a stream of data (`bn_jax.recalibrate`). Useful after training
#   ("precise BN"), after folding, pruning or quantization, and on a new input
#   distribution (AdaBN).
#
# We train a small Flax CNN with `bn_jax.linen.BatchNorm` on scikit-learn's 8x8 digits.

# %%
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import bn_jax
from bn_jax import linen as bnn

x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
perm = np.random.default_rng(0).permutation(len(x))
x, y = x[perm], y[perm].astype(np.int32)
x_test, y_test, x_train, y_train = x[:360], y[:360], x[360:], y[360:]


class Net(nn.Module):
    """conv -> BatchNorm -> relu, twice; global average pooling; dense."""

    @nn.compact
    def __call__(self, x, train: bool):
        for features in (16, 32):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = bnn.BatchNorm(use_running_average=not train, momentum=0.99)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean((1, 2)))


model = Net()
variables = model.init(jax.random.key(0), x_train[:2], train=False)
tx = optax.sgd(0.1, momentum=0.9)


@jax.jit
def train_step(variables, opt_state, xb, yb):
    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, xb, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    upd, opt_state = tx.update(grads, opt_state)
    return {"params": optax.apply_updates(variables["params"], upd), **updates}, opt_state, loss


@jax.jit
def accuracy(variables, xs, ys):
    return jnp.mean(jnp.argmax(model.apply(variables, xs, train=False), -1) == ys)


opt_state = tx.init(variables["params"])
rng = np.random.default_rng(0)
start = time.perf_counter()
for step in range(200):
    idx = rng.choice(len(x_train), 32, replace=False)
    variables, opt_state, loss = train_step(variables, opt_state, x_train[idx], y_train[idx])
print(f"200 steps in {time.perf_counter() - start:.1f} s, last loss {float(loss):.3f}")
print("test accuracy, running statistics (EMA, momentum 0.99):", f"{float(accuracy(variables, x_test, y_test)):.3f}")

# %% [markdown]
# ## 1. Recalibration ("precise BN")
#
# With `momentum=0.99` the running statistics average over roughly the last 100 steps,
# during which the weights changed a lot, and they started from mean 0, variance 1.
# `recalibrate` runs the model over the training data once and computes, for every
# BatchNorm, the exact mean and variance of its inputs (all batches pooled, not an
# EMA). Here `fn` runs the model in training mode and returns the BatchNorm inputs
# (the convolution outputs, captured with Flax's `capture_intermediates`), which is
# the usual precise-BN recipe.

# %%
def bn_inputs(variables, xb):
    _, state = model.apply(
        variables, xb, train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv),
    )
    inter = state["intermediates"]
    return {"BatchNorm_0": inter["Conv_0"]["__call__"][0], "BatchNorm_1": inter["Conv_1"]["__call__"][0]}


batches = [x_train[i : i + 256] for i in range(0, len(x_train), 256)]  # the last batch is smaller
new_stats = bn_jax.recalibrate(lambda xb: bn_inputs(variables, xb), batches, progress=False)
recalibrated = {"params": variables["params"], "batch_stats": new_stats}

print("running mean of BatchNorm_1 (first 4), EMA         :", np.asarray(variables["batch_stats"]["BatchNorm_1"]["mean"][:4]))
print("running mean of BatchNorm_1 (first 4), recalibrated:", np.asarray(new_stats["BatchNorm_1"]["mean"][:4]))
print("test accuracy, EMA statistics         :", f"{float(accuracy(variables, x_test, y_test)):.3f}")
print("test accuracy, recalibrated statistics:", f"{float(accuracy(recalibrated, x_test, y_test)):.3f}")

# %% [markdown]
# The statistics are exact: the recalibrated values equal the mean and variance of all
# the BatchNorm inputs at once, computed directly (here for the first layer, whose
# input does not depend on any other BatchNorm):

# %%
z0 = np.asarray(bn_inputs(variables, x_train)["BatchNorm_0"], np.float64).reshape(-1, 16)
print("max |recalibrated mean - direct mean|:", float(np.abs(new_stats["BatchNorm_0"]["mean"] - z0.mean(0)).max()))
print("max |recalibrated var  - direct var| :", float(np.abs(new_stats["BatchNorm_0"]["var"] - z0.var(0)).max()))

# %% [markdown]
# ## 2. A new input distribution (AdaBN)
#
# Test images arrive with lower contrast and an offset (`0.5 * x + 0.3`), a shift the
# model never saw. Recalibrating on *unlabeled* shifted images, without touching a
# single weight, adapts the BatchNorm statistics to the new domain (Li et al., 2016).
# Here we use `state=` and evaluation mode with two passes (the network's BatchNorm
# depth), which gives exactly the statistics the evaluation-mode model sees, layer by
# layer.

# %%
shift = lambda a: 0.5 * a + 0.3
x_test_shifted = shift(x_test)
x_unlabeled = shift(x_train[:512])  # images only, no labels


def bn_inputs_eval(stats, xb):
    _, state = model.apply(
        {"params": variables["params"], "batch_stats": stats}, xb, train=False, mutable=["intermediates"],
        capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv),
    )
    inter = state["intermediates"]
    return {"BatchNorm_0": inter["Conv_0"]["__call__"][0], "BatchNorm_1": inter["Conv_1"]["__call__"][0]}


adapted_stats = bn_jax.recalibrate(
    bn_inputs_eval, [x_unlabeled[i : i + 128] for i in range(0, 512, 128)],
    state=new_stats, passes=2, progress=False,
)
adapted = {"params": variables["params"], "batch_stats": adapted_stats}
print("clean test images,   recalibrated on clean data  :", f"{float(accuracy(recalibrated, x_test, y_test)):.3f}")
print("shifted test images, recalibrated on clean data  :", f"{float(accuracy(recalibrated, x_test_shifted, y_test)):.3f}")
print("shifted test images, recalibrated on shifted data:", f"{float(accuracy(adapted, x_test_shifted, y_test)):.3f}")

# %% [markdown]
# ## 3. Folding BatchNorm into the convolutions
#
# `fold_batch_norms` takes the variable tree and `(layer, BatchNorm)` pairs and returns
# the variables of the same network without those BatchNorms, each convolution's kernel
# scaled per output channel and given a bias. The folded model is the same architecture
# with the BatchNorm lines deleted (and `use_bias=True` on the convolutions).

# %%
class FoldedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        for features in (16, 32):
            x = nn.relu(nn.Conv(features, (3, 3), use_bias=True)(x))
        return nn.Dense(10)(x.mean((1, 2)))


folded = bn_jax.fold_batch_norms(recalibrated, [("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1")])
print("folded variables:", jax.tree.map(lambda a: a.shape, folded))

logits_bn = jax.jit(lambda v, x: model.apply(v, x, train=False))(recalibrated, x_test)
logits_folded = jax.jit(FoldedNet().apply)(folded, x_test)
print("max |logits folded - logits with BatchNorm|:", float(jnp.abs(logits_folded - logits_bn).max()))
print("max |logits| for scale                      :", float(jnp.abs(logits_bn).max()))
print("predictions identical:", bool(jnp.all(logits_folded.argmax(-1) == logits_bn.argmax(-1))))

# %% [markdown]
# The folded network computes the same function to float32 rounding with two fewer
# layers. For a single layer outside a Flax tree, `fold_into_conv` / `fold_into_dense`
# take the arrays directly, in Flax (`HWIO`, `(in, out)`) or, with `feature_axis=0`,
# PyTorch (`OIHW`, `(out, in)`) layout:

# %%
conv_p, bn_p = recalibrated["params"]["Conv_0"], recalibrated["params"]["BatchNorm_0"]
kernel, bias = bn_jax.fold_into_conv(conv_p["kernel"], None, bn_p, new_stats["BatchNorm_0"])
z = jax.lax.conv_general_dilated(
    jnp.asarray(x_test[:8]), conv_p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
)
reference, _ = bn_jax.BatchNorm().apply(bn_p, new_stats["BatchNorm_0"], z, training=False)
z_folded = jax.lax.conv_general_dilated(
    jnp.asarray(x_test[:8]), kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
) + bias
print("kernel", kernel.shape, "bias", bias.shape)
print("max |folded conv - conv + BatchNorm|:", float(jnp.abs(z_folded - reference).max()))

# %% [markdown]
# **Order of operations for deployment:** train → recalibrate (precise BN) → fold →
# (optionally quantize, then recalibrate again on the unfolded model if the
# activations changed) → export. Folding must use the BatchNorm's `epsilon`
# (default 1e-5 in bn_jax and Flax).
