"""The errors a user can fix. The command-line tools print them as one line, without a traceback (unless --debug).

Every other exception is a bug and keeps its traceback. Each class also derives from the built-in error it
specializes, so code that catches ValueError or FileNotFoundError keeps working.
"""


class UserError(Exception):
  """A mistake in what the user asked for: a config, a path, a dataset. The message says what and where."""


class ConfigError(UserError, ValueError):
  """A config that cannot work; the message names the key."""


class DatasetError(UserError, ValueError):
  """A dataset that cannot be used at all (malformed json, no images, wrong class count): stops at start-up."""


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
  """A file the dataset needs (annotation json, TFRecord shards, tfds data_dir) does not exist."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """No checkpoint (or not the asked-for step) in a workdir, and nothing to fall back on."""


class CheckpointDamagedError(UserError, ValueError):
  """A checkpoint whose files do not restore (damaged after it was written), with no intact one to fall back on."""


class CheckpointMismatchError(UserError, ValueError):
  """A workdir holds a run of another model than the one the config describes."""


class WorkdirError(UserError, OSError):
  """A --workdir that is a file, cannot be created, or (for read-only tools) does not exist."""


class WeightFileError(UserError, ValueError):
  """A weight file (conret-import input, config.init_from) that is missing, unreadable or of another network."""


class WeightFileNotFoundError(WeightFileError, FileNotFoundError):
  """A weight file named for reading (conret-import --input) that does not exist."""


class OutputExistsError(UserError, FileExistsError):
  """An --output folder that exists and is not empty, where the tool would write over it (without --overwrite)."""


class ExportError(UserError, RuntimeError):
  """A model that cannot be exported here: a JAX or TensorFlow version the export does not know, a SavedModel that
  does not run once written (nothing is then left behind)."""
