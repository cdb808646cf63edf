"""Paths and small files, the same for local and remote (gs://) workdirs.

Remote paths go through TensorFlow's gfile, imported only when one is used, so code that reads local files needs no
TensorFlow (the GPU image has none).
"""

import os


def is_remote(path: str) -> bool:
  return '://' in path


def absolute(path: str) -> str:
  """orbax wants absolute paths: a relative local path (`--workdir=runs/x`) is made absolute; gs:// is kept."""
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def open_file(path: str, mode: str = 'r'):
  if is_remote(path):
    import tensorflow as tf

    return tf.io.gfile.GFile(path, mode)
  return open(path, mode, encoding=None if 'b' in mode else 'utf-8')


def exists(path: str) -> bool:
  if is_remote(path):
    import tensorflow as tf

    return tf.io.gfile.exists(path)
  return os.path.exists(path)


def makedirs(path: str) -> None:
  """Creates a folder and its parents; an existing one is fine."""
  if is_remote(path):
    import tensorflow as tf

    tf.io.gfile.makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  if is_remote(path):
    import tensorflow as tf

    return tf.io.gfile.listdir(path)
  return os.listdir(path)


def rename(source: str, target: str, overwrite: bool = False) -> None:
  """Moves a file or folder (gs://: gfile's copy-and-delete, which is what a bucket offers); `overwrite` replaces a
  file at `target`."""
  if is_remote(source):
    import tensorflow as tf

    tf.io.gfile.rename(source, target, overwrite=overwrite)
  elif overwrite:
    os.replace(source, target)
  else:
    os.rename(source, target)


def write_text(path: str, text: str) -> None:
  """Writes a small text file whole or not at all: into `path`.tmp, then renamed over `path` (a local rename is
  atomic; a bucket's object appears only once written), so a process killed midway leaves the old file intact."""
  tmp = f'{path}.tmp'
  with open_file(tmp, 'w') as f:
    f.write(text)
  rename(tmp, path, overwrite=True)
