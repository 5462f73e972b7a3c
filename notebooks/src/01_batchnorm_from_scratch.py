# %% [markdown]
# # 01 · Batch Normalization from scratch
#
# This notebook builds BatchNorm (Ioffe & Szegedy, 2015) from its formula, checks
# `bn_jax.BatchNorm` against it, shows why training must use the statistics of the
# current batch, walks through three mistakes of a widely copied "BatchNorm from
# scratch" snippet (each with numbers), and shows why the variance formula matters
# when the mean is large.
#
# Everything runs on CPU in a few seconds.

# %%
import jax
import jax.numpy as jnp
import numpy as np

import bn_jax

np.set_printoptions(precision=4, suppress=True)
rng = np.random.default_rng(0)
print("jax", jax.__version__, "| bn_jax", bn_jax.__version__)

# %% [markdown]
# ## 1. The math
#
# For a batch `x` of shape `[N, C]`, per feature `c`:
#
# $$\mu_c = \frac{1}{N}\sum_i x_{ic}, \qquad
#   \sigma^2_c = \frac{1}{N}\sum_i (x_{ic}-\mu_c)^2, \qquad
#   y_{ic} = \gamma_c\,\frac{x_{ic}-\mu_c}{\sqrt{\sigma^2_c+\epsilon}} + \beta_c .$$
#
# The variance is the *biased* one (divide by `N`). During training the layer also keeps
# running averages for inference: `running = momentum * running + (1 - momentum) * batch`
# (Flax convention; PyTorch's `momentum=0.1` is `momentum=0.9` here). At inference the
# running statistics replace the batch ones, so one example's output does not depend on
# the rest of the batch.
#
# Here is that formula in float64 NumPy, next to `bn_jax.BatchNorm`:

# %%
def bn_reference(x, gamma, beta, eps=1e-5):
    mu = x.mean(0)
    var = ((x - mu) ** 2).mean(0)
    return gamma * (x - mu) / np.sqrt(var + eps) + beta, mu, var


x = rng.normal(5.0, 3.0, size=(32, 4)).astype(np.float32)
norm = bn_jax.BatchNorm(momentum=0.9)
params, state = norm.init(4)
params = {"scale": jnp.array([1.0, 2.0, 0.5, 1.0]), "bias": jnp.array([0.0, 1.0, -1.0, 3.0])}

y, new_state = norm.apply(params, state, x, training=True)
y_ref, mu, var = bn_reference(x.astype(np.float64), np.asarray(params["scale"]), np.asarray(params["bias"]))

print("max |bn_jax - reference|      :", np.abs(np.asarray(y) - y_ref).max())
print("output mean per feature       :", np.asarray(y).mean(0))
print("output std per feature        :", np.asarray(y).std(0))
print("running mean after one step   :", np.asarray(new_state["mean"]), " = 0.1 * batch mean", 0.1 * mu)
print("running var after one step    :", np.asarray(new_state["var"]), " = 0.9 + 0.1 * batch var", 0.9 + 0.1 * var)

# %% [markdown]
# The output has mean `beta` and standard deviation `gamma` per feature, and the
# running statistics moved 10% of the way from their start (mean 0, variance 1)
# towards the batch statistics.

# %% [markdown]
# ## 2. Why training uses the statistics of the batch
#
# One could ask: why not normalize with the running statistics during training too,
# so that training and inference compute the same thing? Ioffe & Szegedy (section 2)
# answer: the gradient must *see* the normalization. If the mean is treated as a
# constant, the optimizer does not know that shifting the input is undone by the
# normalization, so it keeps pushing.
#
# A one-line experiment: a layer `z = x + b` followed by normalization and a squared
# loss. With real batch statistics, `b` has **zero** gradient (any shift of `z` is
# removed by subtracting its mean). With the mean and variance held constant (what
# normalizing with running statistics amounts to, as far as the gradient is
# concerned), `b` receives a gradient at every step and drifts without bound, while
# the loss does not change at all.

# %%
xb = jnp.asarray(rng.normal(size=(64, 1)), jnp.float32)
target = 0.5 * xb + jnp.asarray(rng.normal(size=(64, 1)), jnp.float32) + 2.0
bn1 = bn_jax.BatchNorm(momentum=0.9, use_scale=False, use_bias=False)
_, st1 = bn1.init(1)


def loss_batch_stats(b):
    y, _ = bn1.apply({}, st1, xb + b, training=True)
    return jnp.mean((y - target) ** 2)


def loss_constant_stats(b):
    z = xb + b
    mu, var = jax.lax.stop_gradient(z.mean(0)), jax.lax.stop_gradient(z.var(0))
    return jnp.mean(((z - mu) / jnp.sqrt(var + 1e-5) - target) ** 2)


for name, loss in [("batch statistics", loss_batch_stats), ("constant statistics", loss_constant_stats)]:
    b = jnp.float32(0.0)
    grad = jax.jit(jax.value_and_grad(loss))
    first, _ = grad(b)
    for step in range(200):
        value, g = grad(b)
        b = b - 0.1 * g
    print(f"{name:20s}: 200 SGD steps: b 0.00 -> {float(b):7.2f}, loss {float(first):.4f} -> {float(value):.4f}")

# %% [markdown]
# With constant statistics the bias has walked off to a large value, and the
# loss is what it was: the normalization silently cancels every step.
# In a deep network the same drift happens to every layer feeding a BatchNorm.
# With batch statistics the gradient of the bias is exactly zero. `bn_jax` never
# differentiates the formula naively, though: its backward pass is the fused one
# (two reductions per channel and one elementwise pass), and its result matches
# `jax.grad` of the plain formula:

# %%
def plain_bn(z):
    mu = z.mean(0)
    var = ((z - mu) ** 2).mean(0)
    return (z - mu) / jnp.sqrt(var + 1e-5)


z = jnp.asarray(rng.normal(2.0, 3.0, size=(16, 3)), jnp.float32)
w = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
bn3 = bn_jax.BatchNorm(use_scale=False, use_bias=False)
_, st3 = bn3.init(3)
g_bn = jax.grad(lambda z: jnp.sum(w * bn3.apply({}, st3, z, training=True)[0]))(z)
g_plain = jax.grad(lambda z: jnp.sum(w * plain_bn(z)))(z)
print("max |grad bn_jax - grad plain formula|:", float(jnp.abs(g_bn - g_plain).max()))
print("sum of the input gradient per feature  :", np.asarray(g_bn.sum(0)), "(zero: shifts are free)")

# %% [markdown]
# ## 3. Three mistakes of a widely copied snippet
#
# A "BatchNorm from scratch" class circulates in blog posts and answers, in PyTorch.
# Written out in NumPy, the pattern is:
#
# ```python
# def forward(self, x):
#     if self.training:
#         mean, var = x.mean(0), x.var(0)
#         self.running_mean = self.momentum * self.running_mean + mean   # (3) adds, does not blend
#         self.running_var = self.momentum * self.running_var + var
#     x_hat = (x - self.running_mean) / sqrt(self.running_var + eps)     # (1) running stats in training
#     out = self.gamma * x_hat + self.beta
#     self.gamma = self.gamma - lr * (out * x_hat).mean(0)               # (2) parameters updated
#     self.beta = self.beta - lr * out.mean(0)                           #     inside forward
#     return out
# ```
#
# Below, a correct NumPy implementation has each mistake switched on one at a time, so
# the effect of each is visible on its own. The data: 4 features with mean 5 and
# standard deviation 3 (a typical pre-activation that is not centred).

# %%
class NumpyBN:
    """BatchNorm in NumPy with optional mistakes from the copied snippet."""

    def __init__(self, c, momentum=0.9, eps=1e-5, lr=0.1, mistakes=()):
        self.gamma, self.beta = np.ones(c), np.zeros(c)
        self.running_mean, self.running_var = np.zeros(c), np.ones(c)
        self.momentum, self.eps, self.lr, self.mistakes = momentum, eps, lr, set(mistakes)

    def forward(self, x, training):
        if training:
            mean, var = x.mean(0), x.var(0)
            if "adds" in self.mistakes:
                self.running_mean = self.momentum * self.running_mean + mean
                self.running_var = self.momentum * self.running_var + var
            else:
                self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * mean
                self.running_var = self.momentum * self.running_var + (1 - self.momentum) * var
        if training and "running-in-training" not in self.mistakes:
            x_hat = (x - mean) / np.sqrt(var + self.eps)
        else:
            x_hat = (x - self.running_mean) / np.sqrt(self.running_var + self.eps)
        out = self.gamma * x_hat + self.beta
        if "updates-in-forward" in self.mistakes:
            self.gamma = self.gamma - self.lr * (out * x_hat).mean(0)
            self.beta = self.beta - self.lr * out.mean(0)
        return out


batches = [rng.normal(5.0, 3.0, size=(32, 4)) for _ in range(100)]

# %% [markdown]
# ### Mistake 1: normalizing with the running statistics during training
#
# Running statistics start at mean 0, variance 1 and need many steps to catch up, so
# early in training the layer does not normalize at all; and as section 2 showed, the
# gradient no longer sees the normalization. Output statistics of the first batches:

# %%
good, bad = NumpyBN(4), NumpyBN(4, mistakes={"running-in-training"})
print("step | correct: out mean, out std | mistake 1: out mean, out std")
for step, b in enumerate(batches[:30]):
    yg, yb = good.forward(b, True), bad.forward(b, True)
    if step in (0, 1, 4, 9, 29):
        print(f"{step + 1:4d} |          {yg.mean():6.3f}, {yg.std():6.3f}   |          {yb.mean():6.3f}, {yb.std():6.3f}")

# %% [markdown]
# The correct layer gives mean 0 and std 1 from the first step. With mistake 1 the
# first outputs are far from that (the running statistics have moved only 10% of the
# way after one step), and it takes tens of steps for them to catch up at
# `momentum=0.9`; at Flax's default `momentum=0.99` it takes hundreds.

# %% [markdown]
# ### Mistake 2: updating gamma and beta inside the forward pass
#
# Parameters belong to the optimizer, which updates them from the gradient of the
# loss. Updating them inside `forward` changes the model whenever it is *called*,
# including at evaluation: the same input gives a different answer each time.

# %%
bn = NumpyBN(4, mistakes={"updates-in-forward"})
for b in batches[:50]:
    bn.forward(b, True)
probe = batches[0][:3]
print("gamma after 50 training calls:", bn.gamma)
for call in range(3):
    print(f"eval call {call + 1}: output[0] =", bn.forward(probe, False)[0])
print("gamma after 3 eval calls     :", bn.gamma)

# %% [markdown]
# Evaluating three times gives three answers, and gamma keeps shrinking with every
# call, whatever the loss is. The "update rule" it applies is not the gradient of
# any loss the model is trained on. In `bn_jax`, `apply` is a pure function: it
# returns the new *state* (running statistics only), and `params` change only
# when your optimizer changes them.

# %% [markdown]
# ### Mistake 3: adding instead of blending the momentum
#
# `running = momentum * running + batch` is a geometric series: it converges to
# `batch / (1 - momentum)`, ten times the true value at `momentum=0.9`.

# %%
good, bad = NumpyBN(4), NumpyBN(4, mistakes={"adds"})
for b in batches:
    good.forward(b, True)
    bad.forward(b, True)
true_mean = np.concatenate(batches).mean(0)
true_var = np.concatenate(batches).var(0)
print("true mean          :", true_mean)
print("blended (correct)  :", good.running_mean)
print("added (mistake 3)  :", bad.running_mean)
print("true var           :", true_var)
print("blended (correct)  :", good.running_var)
print("added (mistake 3)  :", bad.running_var)
x_eval = batches[0]
for name, layer in [("correct", good), ("mistake 3", bad)]:
    y = layer.forward(x_eval, False)
    print(f"eval output with {name:9s}: mean {y.mean():7.3f}, std {y.std():6.3f}")

# %% [markdown]
# With mistake 3 the eval-time outputs are centred near -5 with a standard deviation
# near 0.4, far from the mean 0, std 1 the next layer was trained on: the network
# works in training and fails at inference, the classic symptom. `bn_jax`
# follows the blended rule of both Flax and PyTorch:

# %%
norm = bn_jax.BatchNorm(momentum=0.9)
params, state = norm.init(4)
step = jax.jit(lambda s, b: norm.apply(params, s, b, training=True)[1])
for b in batches:
    state = step(state, jnp.asarray(b, jnp.float32))
print("bn_jax running mean:", np.asarray(state["mean"]))
print("bn_jax running var :", np.asarray(state["var"]))

# %% [markdown]
# ## 4. Fast versus stable variance
#
# The textbook one-pass formula `Var = E[x²] − E[x]²` subtracts two huge, nearly equal
# numbers when `|mean| >> std`. In float32 at mean 10⁴ and std 1, `E[x²] ≈ 10⁸` and
# float32 keeps about 7 significant digits, so the difference is rounding noise.
# `bn_jax` uses a shifted one-pass formula by default and offers the textbook one as
# `use_fast_variance=True`. (Flax's BatchNorm defaults to the textbook formula.)

# %%
x_big = jnp.asarray(rng.normal(1e4, 1.0, size=(256, 8)), jnp.float32)
x64 = np.asarray(x_big, np.float64)
print(f"float64 reference: mean {x64.mean():.4f}, std {x64.std(0).mean():.5f}")
for fast in (False, True):
    norm = bn_jax.BatchNorm(momentum=0.0, use_fast_variance=fast)  # momentum=0: state = batch stats
    params, state = norm.init(8)
    y, state = norm.apply(params, state, x_big, training=True)
    y_std, v = np.asarray(y).std(0), np.asarray(state["var"])
    print(
        f"use_fast_variance={fast!s:5}: batch var in [{v.min():8.4f}, {v.max():8.4f}], "
        f"output std in [{y_std.min():9.4f}, {y_std.max():9.4f}]"
    )

# %%
import flax.linen as nn

flax_bn = nn.BatchNorm(use_running_average=False)
variables = flax_bn.init(jax.random.key(0), x_big)
y_flax, _ = flax_bn.apply(variables, x_big, mutable=["batch_stats"])
print("flax.linen.BatchNorm (default)             output std:", float(np.asarray(y_flax).std(0).mean()))
y_flax, _ = nn.BatchNorm(use_running_average=False, use_fast_variance=False).apply(
    variables, x_big, mutable=["batch_stats"]
)
print("flax.linen.BatchNorm (use_fast_variance=False) output std:", float(np.asarray(y_flax).std(0).mean()))

# %% [markdown]
# The output should have standard deviation 1. The shifted formula gets it right to
# about 1e-5; the textbook formula returns a variance that is rounding noise (often
# zero, clamped), so the output std is off by orders of magnitude. Inputs with a
# large offset are not exotic: unnormalized pixel values, timestamps, sensor readings.
# The stable formula reads `x` once, like the fast one, so it costs no extra pass over
# memory.
#
# **Next:** `02_distributed.ipynb` computes the same statistics across 8 devices.
