"""Writing folders so that nothing is lost and nothing is half-written, whatever moment a run is killed.

A folder is written under a temporary name beside its target (``.NAME.<pid>.<random>.tmp``) and
renamed into place only when complete. Replacing an existing folder takes three steps::

    1. target -> .NAME.backup      (the old folder is kept, whole, under a fixed name)
    2. temporary -> target         (the new folder appears, whole)
    3. delete .NAME.backup

A run killed between any two steps leaves either the old or the new folder under one of the two
names; :func:`recover`, called before the next write (and by :func:`temp_folder`), restores the
backup when the target is missing, removes it when the target is there, and deletes temporary
folders whose process is gone.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Union

from segmoe_lab.errors import FolderError


def backup_path(target: Union[str, Path]) -> Path:
    """Where :func:`replace_folder` keeps ``target``'s old contents until the new ones are in place."""
    target = Path(target)
    return target.parent / f".{target.name}.backup"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def stale_temps(target: Union[str, Path]) -> list[Path]:
    """Temporary folders/files of ``target`` left by runs whose process no longer exists."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    stale = []
    for p in target.parent.glob(f".{target.name}.*.tmp"):
        pid = p.name[len(target.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.append(p)
    return stale


def recover(target: Union[str, Path]) -> list[str]:
    """Finish or undo an interrupted replacement of ``target`` and delete stale temporaries.

    Returns what was done, one line each (also issued as a warning), so a caller can report it.
    """
    target = Path(target)
    done = []
    backup = backup_path(target)
    if backup.exists():
        if target.exists():  # killed after step 2: the new folder is whole, the old one is surplus
            shutil.rmtree(backup, ignore_errors=True)
            done.append(f"removed {backup}, left by an interrupted replacement of {target} (the new one was complete)")
        else:  # killed between steps 1 and 2: put the old folder back
            os.replace(backup, target)
            done.append(f"restored {target} from {backup}, left by an interrupted replacement")
    for tmp in stale_temps(target):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        done.append(f"removed {tmp}, the temporary output of a run that crashed")
    for line in done:
        warnings.warn(line, stacklevel=2)
    return done


def temp_folder(target: Union[str, Path]) -> Path:
    """A new empty temporary folder beside ``target`` (after :func:`recover`), named after this process."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))


def replace_folder(tmp: Union[str, Path], target: Union[str, Path]) -> Path:
    """Move the complete folder ``tmp`` to ``target``, replacing ``target`` in the three steps above."""
    tmp, target = Path(tmp), Path(target)
    backup = backup_path(target)
    if target.exists():
        os.replace(target, backup)
    os.replace(tmp, target)
    shutil.rmtree(backup, ignore_errors=True)
    return target


def disk_full(err: BaseException, path: Union[str, Path]) -> Exception:
    """A :class:`FolderError` naming ``path`` for a full disk (ENOSPC / EDQUOT); ``err`` itself otherwise."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return FolderError(f"the disk is full ({err.strerror}); nothing was written", file=path,
                           fix="free some space or write elsewhere, then run again")
    return err
