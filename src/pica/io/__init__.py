"""Files of an adapter or output directory: crash-safe directory writes and checks of what is on disk.

This module knows nothing about ``peft``: it only handles paths, JSON and safetensors, so it can be
tested on its own. ``pica.tuner.integration`` uses it from peft's save and load paths, the ``pica``
command and the exports for their output directories.

**Staging.** Every file is written completely into a hidden *staging* directory on the target's own
filesystem, flushed to disk (a failed flush is an error: nothing is replaced), and only then moved
in with :func:`os.replace`. Staging directories are named ``.<name>.pica-<state>-<pid>-<token>@<host>``
(``<name>`` is empty inside the target) and go through three states, each entered by one atomic
rename: ``partial`` (being written), ``complete`` (every file written and flushed: the new version is
decided), ``old`` (a replaced directory waiting to be deleted). The next write to the same place (or
the next PiCa load of it) finishes what a killed process left: a ``partial`` directory of a process
that no longer exists is deleted (its write never happened). Inside an adapter directory a ``complete``
one is moved in (its save happened). Beside an output, a ``complete`` one is published and an ``old`` one
put back, but only where nothing is at the output's path: otherwise (the write's own result, or a
directory the user made since) both are kept, the leftover renamed ``<name>.pica-interrupted-<token>`` or
``<name>.pica-previous-<token>`` with a warning: finishing a killed write never deletes or replaces anything.

Two writers:

* :func:`atomic_directory_update` (``save_pretrained``, Trainer checkpoints): stages *inside* the
  target, so it works wherever the target is writable (a mount point, a symlink to another
  filesystem, a read-only parent), and holds an exclusive lock on the target directory for the whole
  save, so concurrent saves into one directory take turns instead of mixing their files; readers take
  the shared lock (:func:`reading_directory`).
* :func:`atomic_directory` (whole outputs: ``pica train``, exports, analysis, the GGUF cache): stages
  beside the target and renames it into place; where that cannot work (the target is a mount point or
  on another filesystem than its parent, or the parent is read-only) it stages inside the existing
  target and swaps the entries.

Directories are created with mode ``0o777`` minus the umask, as ``mkdir`` does (``tempfile.mkdtemp``'s
``0o700`` would hide exports from a serving process running as another user).
"""

from __future__ import annotations

from __future__ import annotations

from .files import AdapterFileError, check_safetensors_file, nesting_depth, read_json_object, read_safetensors_file
from .outputs import OutputWouldDeleteInputError, atomic_directory, check_output_directory, refuse_replacing_inputs
from .staging import directory_lock
from .updates import atomic_directory_update, finish_interrupted_save, reading_directory

__all__ = [
    "AdapterFileError",
    "OutputWouldDeleteInputError",
    "atomic_directory",
    "atomic_directory_update",
    "check_output_directory",
    "check_safetensors_file",
    "directory_lock",
    "finish_interrupted_save",
    "nesting_depth",
    "read_json_object",
    "read_safetensors_file",
    "reading_directory",
    "refuse_replacing_inputs",
]
