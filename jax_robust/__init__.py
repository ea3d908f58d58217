"""jax_robust: accuracy vs. adversarial robustness of image classifiers, in JAX/Flax.

Reimplements the experiments of Yang et al., "A Closer Look at Accuracy vs. Robustness"
(NeurIPS 2020). Import the submodules you need, e.g.::

    from jax_robust import attacks, lipschitz, models, train

This package file imports nothing heavy, so `jax_robust.speed_flags` can set XLA flags
before JAX is first imported.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`jax_robust.load_run` (train.load_run), imported on first use."""
    if name == "load_run":
        from jax_robust.train import load_run

        return load_run
    raise AttributeError(f"module 'jax_robust' has no attribute {name!r}")
