# %% [markdown]
# # 06 · Study: BatchNorm on shifted data, and four ways to adapt at test time
#
# A network trained on clean images meets corrupted ones at test time. Its BatchNorm
# layers normalize with the running statistics of the *training* data, which no longer
# describe what comes in. Because those statistics are a separate, explicit piece of
# state, there are cheap answers that change no weight or only a few:
#
# | method | what changes at test time | reference |
# |---|---|---|
# | source | nothing: evaluation mode, training statistics | |
# | re-estimated statistics (AdaBN) | the running statistics, recomputed on the unlabeled shifted data (`bn_jax.recalibrate`) | Li et al. 2016 |
# | test-batch statistics | each test batch is normalized with its own statistics (`training=True`, the new state dropped) | Nado et al. 2020, Schneider et al. 2020 |
# | TENT | test-batch statistics, and BatchNorm's scale and bias trained to minimize the entropy of the predictions, online | Wang et al., ICLR 2021 |
#
# and networks with GroupNorm, FilterResponseNorm and EvoNorm-S0, which have no batch
# statistics to adapt, are the batch-free baselines (with TENT on GroupNorm's scale and
# bias as well).
#
# The example in TENT's official repository (a WRN-28-10 on CIFAR-10-C, the 15
# corruptions at severity 5) reports 43.5% mean error for the source model, 20.4% with
# test-batch statistics and 18.6% with TENT. This notebook measures the same methods on
# scikit-learn's 8x8 digits with corruptions written in a few lines of NumPy, in the
# pure functional API: each method is a few lines over `init` / `apply`, and `jax.vmap`
# runs it on every corrupted test set at once.
#
# **Configurations.** The stored run below is the small configuration that the test
# suite executes (severities 3 and 5, 2 seeds, short training: numbers to check that it
# runs, not to read conclusions from). The full configuration, `BN_JAX_STUDY=full`, is
# what the documentation's page *Study: distribution shift* shows; from `notebooks/`:
#
# ```bash
# BN_JAX_STUDY=full python src/06_distribution_shift.py   # writes docs/studies/06_distribution_shift.{png,json}
# ```

# %%
import io
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import bn_jax

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from IPython.display import Image, display

CONFIG = os.environ.get("BN_JAX_STUDY", "small")
if CONFIG == "full":
    SEEDS, EPOCHS, SEVERITIES = 4, 30, (1, 2, 3, 4, 5)
else:
    SEEDS, EPOCHS, SEVERITIES = 2, 4, (3, 5)
BATCH, TEST_BATCH = 32, 60
print(f"configuration {CONFIG!r}: {SEEDS} seeds, {EPOCHS} epochs, severities {SEVERITIES}")

x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)  # NHWC, values in [0, 1]
perm = np.random.default_rng(0).permutation(len(x))
x, y = x[perm], y[perm].astype(np.int32)
x_test, y_test = x[:360], jnp.asarray(y[:360])
x_train, y_train = jnp.asarray(x[360:]), jnp.asarray(y[360:])

# %% [markdown]
# ## The corruptions
#
# Four of the CIFAR-10-C / ImageNet-C corruptions (Hendrycks & Dietterich 2019),
# each at five severities, with parameters chosen for 8x8 images in [0, 1] so that
# severity 5 is hard for the source model (ImageNet-C's own parameters are for 224x224
# photographs). The random draws are fixed, so every method sees the same corrupted
# images.

# %%
def gaussian_noise(x, severity, rng):
    sigma = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    return np.clip(x + sigma * rng.normal(size=x.shape), 0, 1)


def impulse_noise(x, severity, rng):  # salt and pepper
    fraction = (0.04, 0.08, 0.12, 0.18, 0.25)[severity - 1]
    hit = rng.random(x.shape) < fraction
    return np.where(hit, (rng.random(x.shape) < 0.5).astype(x.dtype), x)


def gaussian_blur(x, severity, rng):
    sigma = (0.5, 0.7, 0.9, 1.1, 1.4)[severity - 1]
    taps = np.arange(-3, 4)
    k = np.exp(-0.5 * (taps / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))  # the digits' background is 0
    rows = sum(w * pad[:, 3 + t : 11 + t, :, :] for t, w in zip(taps, k))
    return sum(w * rows[:, :, 3 + t : 11 + t, :] for t, w in zip(taps, k))


def contrast(x, severity, rng):
    c = (0.5, 0.35, 0.25, 0.15, 0.08)[severity - 1]
    mean = x.mean((1, 2, 3), keepdims=True)
    return (x - mean) * c + mean


CORRUPTIONS = {f.__name__: f for f in (gaussian_noise, impulse_noise, gaussian_blur, contrast)}
# Every shifted test set stacked: [shift, 360, 8, 8, 1], the clean one first.
SHIFTS = [("clean", 0)] + [(name, s) for name in CORRUPTIONS for s in SEVERITIES]
x_shift = jnp.asarray(
    np.stack([x_test] + [CORRUPTIONS[n](x_test, s, np.random.default_rng(s)) for n, s in SHIFTS[1:]]).astype(np.float32)
)

fig, axes = plt.subplots(len(CORRUPTIONS), len(SEVERITIES) + 1, figsize=(1.1 * (len(SEVERITIES) + 1), 1.1 * len(CORRUPTIONS)), dpi=80)
for row, name in enumerate(CORRUPTIONS):
    for col, s in enumerate((0,) + SEVERITIES):
        ax = axes[row, col]
        ax.imshow(x_shift[0 if s == 0 else SHIFTS.index((name, s))][0, :, :, 0], cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if col == 0:
            ax.set_ylabel(name.replace("_", "\n"), fontsize=7)
        if row == 0:
            ax.set_title("clean" if s == 0 else f"severity {s}", fontsize=7)
fig.tight_layout()
buf = io.BytesIO()
fig.savefig(buf, format="png")
plt.close(fig)
examples_png = buf.getvalue()
display(Image(data=examples_png))

# %% [markdown]
# ## The models, trained on clean images
#
# The CNN of notebook 05 (`conv 3x3 (16) -> norm -> relu -> conv 3x3 stride 2 (32) ->
# norm -> relu -> conv 3x3 stride 2 (32) -> norm -> relu -> global average pool ->
# dense (10)`) with BatchNorm (momentum 0.9), GroupNorm (4 groups),
# FilterResponseNorm or EvoNorm-S0 (4 groups; these two end with their own
# nonlinearity, so no ReLU follows them), in the pure API.
# `forward` also returns each normalization layer's input, which is what
# `recalibrate` measures. SGD with momentum 0.9, batch 32, learning rate 0.05 with a
# short warm-up and a cosine decay; one compiled program per normalizer, run once per
# seed.

# %%
WIDTHS, STRIDES = (16, 32, 32), (1, 2, 2)
NORMS = {
    "BatchNorm": bn_jax.BatchNorm(momentum=0.9),
    "GroupNorm": bn_jax.GroupNorm(num_groups=4),
    "FilterResponseNorm": bn_jax.FilterResponseNorm(),
    "EvoNormS0": bn_jax.EvoNormS0(num_groups=4),
}
OWN_ACTIVATION = (bn_jax.FilterResponseNorm, bn_jax.EvoNormS0)  # FRN's TLU, S0's x * sigmoid(v x): no ReLU after


def init(seed, norm):
    rng = np.random.default_rng(seed)
    params, state, c_in = [], [], 1
    for c in WIDTHS:
        w = rng.normal(size=(3, 3, c_in, c)).astype(np.float32) * np.sqrt(2.0 / (9 * c_in))
        norm_params, s = norm.init(c)
        params.append({"w": jnp.asarray(w), "norm": norm_params})
        state.append(s)
        c_in = c
    w = rng.normal(size=(c_in, 10)).astype(np.float32) * np.sqrt(1.0 / c_in)
    params.append({"w": jnp.asarray(w), "b": jnp.zeros(10)})
    return params, state


def forward(norm, params, state, h, training):
    """Logits, the new normalization states, and each normalization layer's input."""
    new_state, inputs = [], []
    for layer, s, stride in zip(params[:-1], state, STRIDES):
        h = jax.lax.conv_general_dilated(h, layer["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        inputs.append(h)
        h, s = norm.apply(layer["norm"], s, h, training=training)
        new_state.append(s)
        h = h if isinstance(norm, OWN_ACTIVATION) else jax.nn.relu(h)
    return h.mean((1, 2)) @ params[-1]["w"] + params[-1]["b"], new_state, inputs


def train(norm):
    """One compiled training program; returns a function of the seed."""
    steps = EPOCHS * len(x_train) // BATCH
    tx = optax.sgd(optax.warmup_cosine_decay_schedule(0.0, 0.05, steps // 20, steps), momentum=0.9)

    @jax.jit
    def program(params, state, order):
        def step(carry, idx):
            params, state, opt = carry

            def loss(params):
                logits, new_state, _ = forward(norm, params, state, x_train[idx], training=True)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx]).mean(), new_state

            grads, state = jax.grad(loss, has_aux=True)(params)
            updates, opt = tx.update(grads, opt)
            return (optax.apply_updates(params, updates), state, opt), None

        (params, state, _), _ = jax.lax.scan(step, (params, state, tx.init(params)), order)
        return params, state

    return lambda seed: program(*init(seed, norm), np.random.default_rng(100 + seed).integers(0, len(x_train), (steps, BATCH)))


start = time.perf_counter()
models = {}  # name -> [(params, state) per seed]
for name, norm in NORMS.items():
    run = train(norm)
    models[name] = [run(seed) for seed in tqdm(range(SEEDS), desc=name, file=sys.stdout, ncols=80)]
print(f"trained {len(NORMS)} models x {SEEDS} seeds in {time.perf_counter() - start:.0f} s")

# %% [markdown]
# ## The methods, each a few lines over the pure API
#
# A method is a function `predict(params, state, x)` of one model and one test set of
# 360 images; `jax.vmap` maps it over the stacked shifted test sets, and `jax.jit`
# compiles it once for all of them.

# %%
def test_batches(x):  # the 360 test images as 6 batches of 60, in a fixed order
    return x.reshape(-1, TEST_BATCH, *x.shape[1:])


def source(norm):
    def predict(params, state, x):
        return jnp.argmax(forward(norm, params, state, x, training=False)[0], -1)

    return predict


def test_batch_statistics(norm):
    def predict(params, state, x):
        logits = jax.vmap(lambda xb: forward(norm, params, state, xb, training=True)[0])(test_batches(x))
        return jnp.argmax(logits, -1).reshape(-1)

    return predict


# TENT: the normalization layers' scale and bias trained to minimize the entropy of the
# predictions on the test batches, with test-batch statistics; every other weight stays
# frozen. Online, as in the paper: each batch is predicted, then the step is taken
# (Adam at 1e-3, the paper's CIFAR setting). The scan runs TENT_PASSES passes over the
# test set and returns the predictions of every pass: the first pass is the paper's
# protocol, the later ones show what more steps do.
TENT_PASSES = 10
tent_tx = optax.adam(1e-3)


def tent(norm):
    def predict(params, state, x):
        def step(carry, xb):
            affine, opt = carry

            def entropy(affine):
                p = [{**layer, "norm": a} for layer, a in zip(params, affine)] + params[len(affine) :]
                logits = forward(norm, p, state, xb, training=True)[0]
                return -jnp.mean(jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), -1)), logits

            (_, logits), grads = jax.value_and_grad(entropy, has_aux=True)(affine)
            updates, opt = tent_tx.update(grads, opt, affine)
            return (optax.apply_updates(affine, updates), opt), jnp.argmax(logits, -1)

        affine = [layer["norm"] for layer in params[:-1]]
        batches = jnp.concatenate([test_batches(x)] * TENT_PASSES)
        _, predictions = jax.lax.scan(step, (affine, tent_tx.init(affine)), batches)
        return predictions.reshape(TENT_PASSES, -1)  # [pass, 360]

    return predict


# %% [markdown]
# Re-estimating the statistics (AdaBN) is one call of `bn_jax.recalibrate` on the
# unlabeled shifted images: `fn(state, batch)` returns every BatchNorm input in
# evaluation mode under `state`, and three passes (the network's BatchNorm depth) make
# each layer's statistics exact given the layers before it. Each batch holds 60 images
# of every shifted test set at once (`vmap` again), and `axis=(0, -1)` makes (shift,
# channel) the feature axes, so every shifted test set gets its own statistics.

# %%
def adabn(norm, params, state):
    """The BatchNorm states re-estimated on each shifted test set: leaves [shift, ...]."""

    def bn_inputs(states, xb):  # xb [shift, 60, 8, 8, 1] -> per layer [shift, 60, h, w, c]
        return jax.vmap(lambda s, x: forward(norm, params, s, x, training=False)[2])(states, xb)

    tiled = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(SHIFTS),) + a.shape), state)
    batches = [x_shift[:, i : i + TEST_BATCH] for i in range(0, x_shift.shape[1], TEST_BATCH)]
    return bn_jax.recalibrate(bn_inputs, batches, state=tiled, passes=len(WIDTHS), axis=(0, -1), progress=False)


# %%
def over_shifts(predict, state_per_shift=False):
    """Test error of `predict` on every shifted test set: [shift] (or [shift, pass])."""
    f = jax.jit(jax.vmap(predict, in_axes=(None, 0 if state_per_shift else None, 0)))
    return lambda params, state: np.asarray(jnp.mean(f(params, state, x_shift) != y_test, axis=-1))


bn, gn = NORMS["BatchNorm"], NORMS["GroupNorm"]
sources = {name: over_shifts(source(norm)) for name, norm in NORMS.items()}
bn_adapted = over_shifts(source(bn), state_per_shift=True)
bn_test_batch = over_shifts(test_batch_statistics(bn))
bn_tent, gn_tent = over_shifts(tent(bn)), over_shifts(tent(gn))

start = time.perf_counter()
per_seed = []
for seed in tqdm(range(SEEDS), desc="adapting", file=sys.stdout, ncols=80):
    (bn_params, bn_state), (gn_params, gn_state) = models["BatchNorm"][seed], models["GroupNorm"][seed]
    bn_tent_err, gn_tent_err = bn_tent(bn_params, bn_state), gn_tent(gn_params, gn_state)  # [shift, pass]
    e = {
        "BatchNorm: source": sources["BatchNorm"](bn_params, bn_state),
        "BatchNorm: AdaBN (recalibrate)": bn_adapted(bn_params, adabn(bn, bn_params, bn_state)),
        "BatchNorm: test-batch stats": bn_test_batch(bn_params, bn_state),
        "BatchNorm: TENT (1 pass)": bn_tent_err[:, 0],
        f"BatchNorm: TENT ({TENT_PASSES} passes)": bn_tent_err[:, -1],
        "GroupNorm: source": sources["GroupNorm"](gn_params, gn_state),
        "GroupNorm: TENT (1 pass)": gn_tent_err[:, 0],
        f"GroupNorm: TENT ({TENT_PASSES} passes)": gn_tent_err[:, -1],
    }
    others = [name for name in NORMS if name not in ("BatchNorm", "GroupNorm")]  # the batch-free baselines
    e.update({f"{name}: source": sources[name](*models[name][seed]) for name in others})
    per_seed.append(e)
err = {name: np.stack([e[name] for e in per_seed], 1) for name in per_seed[0]}  # [shift, seed]
print(f"{len(err)} methods x {len(SHIFTS)} test sets x {SEEDS} seeds in {time.perf_counter() - start:.0f} s")

# %%
def cell(e):  # mean ± standard deviation over the seeds, in %
    return f"{100 * e.mean():.1f} ±{100 * e.std(ddof=1):.1f}"


worst = SEVERITIES[-1]
print(f"test error %, mean ± std over {SEEDS} seeds: clean, each corruption at severity {worst}, their mean,")
print(f"and the mean over every corruption and severity {SEVERITIES}\n")
short = {"gaussian_noise": "noise", "impulse_noise": "impulse", "gaussian_blur": "blur"}
cols = ["clean"] + [short.get(c, c) for c in CORRUPTIONS] + [f"mean {worst}", "mean all"]
print(f"{'':>31s}" + "".join(f"{c:>11s}" for c in cols))
for name, e in err.items():
    at_worst = [e[SHIFTS.index((c, worst))] for c in CORRUPTIONS]
    rows = [e[0], *at_worst, np.mean(at_worst, 0), e[1:].mean(0)]
    print(f"{name:>31s}" + "".join(f"{cell(r):>11s}" for r in rows))

# %%
# The figure leaves out two lines that lie on their neighbours (BatchNorm's TENT over 10
# passes, GroupNorm's TENT over 1 pass); the table has every method.
styles = {
    "BatchNorm: source": ("k", "-"),
    "BatchNorm: AdaBN (recalibrate)": ("tab:blue", "-"),
    "BatchNorm: test-batch stats": ("tab:cyan", "--"),
    "BatchNorm: TENT (1 pass)": ("tab:red", ":"),
    "GroupNorm: source": ("tab:green", "-"),
    f"GroupNorm: TENT ({TENT_PASSES} passes)": ("tab:olive", ":"),
    "FilterResponseNorm: source": ("tab:purple", "-"),
    "EvoNormS0: source": ("tab:brown", "-"),
}
fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(12, 4.2), dpi=100, sharey=True)
levels = (0,) + SEVERITIES
for ax, corruption in zip(axes, CORRUPTIONS):
    for name, (color, ls) in styles.items():
        e = err[name]
        rows = 100 * np.stack([e[0]] + [e[SHIFTS.index((corruption, s))] for s in SEVERITIES])  # [level, seed]
        ax.plot(levels, rows.mean(1), marker="o", ms=3, color=color, ls=ls, label=name)
        ax.fill_between(levels, rows.min(1), rows.max(1), color=color, alpha=0.15)
    ax.set_title(corruption.replace("_", " "))
    ax.set_xticks(levels, ["clean"] + [str(s) for s in SEVERITIES])
    ax.set_xlabel("severity")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("test error %")
handles, labels = axes[0].get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
fig.suptitle(f"digits CNN trained on clean images, adapted at test time ({SEEDS} seeds: mean, band min-max)", fontsize=11)
fig.tight_layout(rect=(0, 0.12, 1, 1))
buf = io.BytesIO()
fig.savefig(buf, format="png")
plt.close(fig)
display(Image(data=buf.getvalue()))

if CONFIG == "full":  # the documentation's figures and numbers
    out = pathlib.Path("../docs/studies")
    out.mkdir(exist_ok=True)
    (out / "06_distribution_shift.png").write_bytes(buf.getvalue())
    (out / "06_corruptions.png").write_bytes(examples_png)
    results = {
        "config": {"seeds": SEEDS, "epochs": EPOCHS, "severities": SEVERITIES, "test_batch": TEST_BATCH, "tent_passes": TENT_PASSES},
        "shifts": SHIFTS,
        "test_error": {name: e.tolist() for name, e in err.items()},
    }
    (out / "06_distribution_shift.json").write_text(json.dumps(results, indent=1) + "\n")
    print("wrote", sorted(p.name for p in out.glob("06_*")))

# %% [markdown]
# ## Reading the results
#
# The conclusions below are those of the full configuration (severities 1 to 5, 4
# seeds, 30 epochs: the documentation's page *Study: distribution shift*, whose numbers
# are quoted here); the small run above only shows that the code runs.
#
# * **Most of what blur and contrast cost the BatchNorm model is its statistics.** At
#   severity 5 the source model errs on 77.7% (blur) and 87.4% (contrast) of the test
#   images; with the statistics re-estimated on the shifted images, 36.9% and 36.7%.
#   Gaussian and impulse noise are helped much less (48.1% to 42.5%, 37.1% to 32.7%);
#   under Gaussian noise every model, adapted or batch-free, ends between 42% and 44%.
# * **AdaBN and test-batch statistics are equivalent here** (37.2% and 37.3% mean error
#   at severity 5): batches of 60 images estimate the statistics as well as the whole
#   test set. On clean images neither costs anything (1.3% and 0.8% against 1.5% with
#   the training statistics; one image is 0.28%, and the seeds spread by about 0.5%).
# * **TENT adds nothing on top.** One online pass (6 Adam steps) gives 37.3%, as do ten
#   passes. On the GroupNorm model, where no statistics can adapt, ten passes of entropy
#   minimization make blur and contrast worse (69.2% to 79.3%, 64.1% to 86.0%): the
#   objective rewards confident predictions, right or wrong.
# * **The batch-free models are more robust than the BatchNorm source model** (52.5%
#   GroupNorm, 56.0% FilterResponseNorm, 57.0% EvoNorm-S0, against 62.6% mean error at
#   severity 5) **and less robust than the adapted BatchNorm model** (37.2%), by far
#   under blur and contrast; under noise they are about as good as it. When unlabeled test
#   data is at hand, BatchNorm's separate statistics are an advantage, not a weakness.
#
# Against the CIFAR-10-C figures of TENT's repository (WRN-28-10, severity 5, 15
# corruptions: 43.5% source, 20.4% test-batch statistics, 18.6% TENT): what transfers
# is the large, label-free step from the statistics, for blur and contrast in
# particular (defocus blur 46.9% to 12.8%, contrast 46.7% to 12.6% there); what does
# not is the recovery under noise (Gaussian noise 72.3% to 28.1% there, 48.1% to 43.3%
# here) and TENT's further gain (largest under noise there: 28.1% to 24.8%). Digits are
# not CIFAR: a pass over the 360 test images is 6 steps of 60, where the repository
# takes 50 steps of 200 on each corruption's 10,000 images; the network has 160
# normalization parameters; and the corruptions are our own, at severities chosen for
# 8x8 images. We did not isolate which of these matters.
