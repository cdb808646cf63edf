"""The config a run saved in its workdir, as a config file: `--config=conret_jax/cli/saved_config.py:WORKDIR`.

The tools pass it themselves when --config is absent and --workdir holds a config.json written by conret-train, so
`conret-eval --workdir=W --config.eval.num_images=500` evaluates W's model with one key changed.
"""

from conret_jax import run_record


def get_config(workdir):
  return run_record.load_config(workdir)
