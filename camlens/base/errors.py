"""Exceptions raised by camlens. Every message names the problem and the fix."""

from __future__ import annotations


class CamlensError(Exception):
    """Base class of every error camlens raises on purpose."""


class LayerNotFoundError(CamlensError, KeyError):
    """A layer name that is not a module of the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TargetError(CamlensError, ValueError):
    """A class index, name or target spec that does not fit the model's output."""


class InputError(CamlensError, ValueError):
    """An input that is not an image or an image batch the model can take."""


class ImageLoadError(InputError):
    """An image file that cannot be read (missing, corrupt, unsupported or too large)."""


class HeadError(CamlensError, ValueError):
    """A network head that cannot give a CAM (not global average pooling + linear)."""


class MethodError(CamlensError, ValueError):
    """An unknown method or a bad method option."""


class NotApplicableError(MethodError, HeadError):
    """A method that cannot run on this model (an attention method on a CNN, D-RISE on a classifier,
    CAM on a detector), refused before any work. A :class:`HeadError` too: code that skips CAM where
    the head cannot give one skips it here as well."""


class WeightsNotFoundError(CamlensError, FileNotFoundError):
    """Pretrained weights that are not on disk (camlens never downloads at run time)."""


class CheckpointError(CamlensError, ValueError):
    """A checkpoint that is missing, truncated, tampered with or for another architecture."""


class OutputExistsError(CamlensError, FileExistsError):
    """An output file that already exists (pass overwrite=True / --overwrite to replace it)."""


class WriteError(CamlensError, OSError):
    """An output that cannot be written: no space left, permission denied, a parent that is not a
    folder, a symbolic link where a file should be written, a read-only file system."""

    def __str__(self) -> str:  # OSError would print "[Errno N] …" once errno/filename are set
        return str(self.args[0]) if self.args else ""


class NonFiniteError(CamlensError, ValueError):
    """NaN or Inf in an input, the model's output (e.g. from NaN weights) or a map: never a plausible
    but meaningless explanation."""


class OutputError(InputError):
    """A model output whose class scores cannot be found (pass output= to choose them)."""


class LayoutError(CamlensError, ValueError):
    """Captured features whose layout (tokens, channels-last) cannot be turned into a grid."""


class StoreError(CamlensError, ValueError):
    """A result store that is damaged (a missing, truncated or corrupt file, a file of the wrong
    kind, a symbolic link inside it) or busy (another run holds its lock). The message names the
    files and the fix — usually the same command again, which verifies the store and recomputes
    what is damaged."""


class StoreBusyError(StoreError):
    """A result store that another run is writing (its lock file names the process and the host)."""
