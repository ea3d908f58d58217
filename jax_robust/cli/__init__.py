"""The experiment binaries (absl flags): run, sweep, report, separation, launch_local.

Each is `python -m jax_robust.cli.<name>`, an installed console script `jax-robust-<name>`,
or `python experiments/<name>.py` from a checkout. The library itself never imports this
package (it needs absl; the library does not).
"""
