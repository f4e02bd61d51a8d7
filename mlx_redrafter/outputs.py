"""Safe writing of outputs: nothing the user owns is ever lost.

Directories (converted models, drafters, checkpoints, `train --out`) are
written by `atomic_output`:

* OUT is refused when it resolves (symlinks and `..` resolved) to a source, to
  a folder holding a source, to the current directory or one of its parents,
  or to the home or root directory (`UnsafeOutputError`, a ValueError).
* An existing OUT is replaced only with force=True, and then only if it is empty
  or this project wrote it and nothing was added since: the marker file
  `.mlx-redrafter` lists every file written (or OUT is exactly one of the layouts
  versions before the marker wrote); anything else is the user's to remove.
* The new output is written into `.OUT.partial.<pid>.<rand>` beside OUT; the
  old OUT is renamed aside (`.OUT.old.<pid>.<rand>`), the new one renamed in,
  then the old one deleted, so a failure at any point leaves the old or the
  new OUT whole.
* SIGTERM and Ctrl-C remove the partial folder (exit 143 / KeyboardInterrupt),
  and a later run sweeps the `.OUT.partial.*` / `.OUT.old.*` folders that a
  killed run (whose pid is gone) left.

Result files (benchmark, eval-drafter) go through `check_new_files` (refuse to
replace an existing file without force) and `atomic_file` / `write_file`
(temp file `.NAME.partial.<pid>.<rand>` beside the target, then os.replace;
removed on SIGTERM / Ctrl-C, and swept by a later run once its writer's pid is
gone).
"""

import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

MARKER = ".mlx-redrafter"

# What earlier versions (before the marker) wrote: (names a directory may hold, names it must hold).
LEGACY_LAYOUTS = [
    ({"config.json", "model.safetensors"}, {"config.json", "model.safetensors"}),  # a drafter
    ({"drafter", "optimizer.safetensors", "state.json"}, {"state.json"}),  # a training checkpoint
]


class UnsafeOutputError(ValueError):
    """OUT names something that must not be written over; the message says what to do instead."""


def resolved(path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _marker(path: Path) -> Optional[dict]:
    """The marker's record, None when there is none or it is not ours."""
    try:
        record = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("written_by") == "mlx-redrafter" else None


def _marker_ok(path: Path) -> bool:
    return _marker(path) is not None


def _entries(path: Path) -> set:
    """Every file and folder under `path`, relative ('a', 'a/b'); symbolic links are listed, not followed."""
    found = set()
    for root, dirs, files in os.walk(path):
        rel = Path(root).relative_to(path)
        found.update(str(rel / name) for name in dirs + files)
    return found


def record_files(directory: Path):
    """List in the marker everything written into `directory` (replacing it later checks nothing was added)."""
    record = _marker(directory) or {}
    record["files"] = sorted(_entries(directory) - {MARKER})
    (directory / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def added_files(path) -> Optional[list]:
    """What in a folder this project wrote was not written by it: [] when nothing; None when the folder
    is not ours, or its marker predates the list of files and it is not exactly a drafter or checkpoint
    (nothing then tells its files from the user's)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return None
    record = _marker(path)
    if record is None or not isinstance(record.get("files"), list):  # an earlier version's output
        return [] if _legacy_layout(path) else None
    added = _entries(path) - set(map(str, record["files"])) - {MARKER}
    return sorted(a for a in added if not _clutter(Path(a).name))


def _clutter(name: str) -> bool:
    """Files a file browser leaves in any folder it shows (Finder, Windows Explorer): not the user's work."""
    return name in (".DS_Store", "Thumbs.db", "desktop.ini") or name.startswith("._")


def written_by_us(path) -> bool:
    """Whether the directory holds this project's marker (or exactly a layout it wrote before markers)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    if _marker_ok(path):
        return True
    return _legacy_layout(path)


def _legacy_layout(path: Path) -> bool:
    """Whether the folder holds exactly a layout versions before the marker (or its list of files) wrote."""
    try:
        names = {p.name for p in path.iterdir()} - {MARKER}
    except OSError:
        return False
    return any(names and names <= allowed and required <= names for allowed, required in LEGACY_LAYOUTS)


def is_empty_dir(path) -> bool:
    path = Path(path)
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def write_marker(directory, what: str, **details):
    from . import __version__

    record = {"written_by": "mlx-redrafter", "version": __version__, "what": what,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}
    (Path(directory) / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def check_location(out, sources: Iterable = ()) -> Path:
    """OUT, resolved, if writing there can destroy nothing but OUT; else UnsafeOutputError."""
    target = resolved(out)
    fix = "choose a new folder for the output"
    if target == Path(target.anchor):
        raise UnsafeOutputError(f"refusing to write the output to {out} (the root directory): {fix}")
    home = resolved(Path.home())
    if target == home or target in home.parents:
        where = "your home directory" if target == home else f"{target}, which holds your home directory"
        raise UnsafeOutputError(f"refusing to write the output to {out} ({where}): {fix}")
    cwd = resolved(Path.cwd())
    if target == cwd or target in cwd.parents:
        where = "the current directory" if target == cwd else f"{target}, which holds the current directory"
        raise UnsafeOutputError(f"refusing to write the output to {out} ({where}): {fix}")
    for src in sources:
        if src is None:
            continue
        s = resolved(src)
        if target == s or target in s.parents:
            what = "is the source" if target == s else f"holds the source {src}"
            raise UnsafeOutputError(f"refusing to write the output to {out}: it {what}; {fix}")
    if target.exists() and not target.is_dir():
        raise UnsafeOutputError(f"{out} is a file, not a folder: choose a new folder for the output")
    check_folders_above(target)
    return target


def check_replaceable(out, target: Path, force: bool):
    """An existing OUT may be replaced: only with force, and only if we wrote it or it is empty."""
    if not os.path.lexists(target):
        return
    if not force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it")
    if is_empty_dir(target):
        return
    added = added_files(target)
    if added is None:
        raise UnsafeOutputError(f"{out} holds files mlx-redrafter did not write, so --force will not replace it: "
                                "remove it yourself or choose another output folder")
    if added:
        shown = ", ".join(added[:3]) + (f" and {len(added) - 3} more" if len(added) > 3 else "")
        raise UnsafeOutputError(f"{out} holds files added after mlx-redrafter wrote it ({shown}), so it will not be "
                                "replaced: move them out or choose another output folder")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def sweep_stale(target: Path):
    """Remove the `.OUT.partial.*` / `.OUT.old.*` folders that a killed run left beside OUT.

    Only folders whose writer's pid is gone and that we wrote (marker) or are empty are touched; an old
    OUT that was renamed aside but never replaced (a run killed mid-swap) is put back.
    """
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(partial|old)\.(\d+)\.[0-9a-f]+$")
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for p in sorted(siblings, key=lambda p: p.name):
        m = pattern.match(p.name)
        if not m or _pid_alive(int(m.group(2))) or p.is_symlink() or not p.is_dir():
            continue
        if not (written_by_us(p) or is_empty_dir(p)):
            continue
        if m.group(1) == "old" and not os.path.lexists(target):
            os.rename(p, target)
        else:
            shutil.rmtree(p, ignore_errors=True)


class Terminated(SystemExit):
    """SIGTERM arrived while an output was being written (exit status 143)."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


@contextmanager
def _cleanup_on_signals():
    """SIGTERM raises Terminated (SIGINT already raises KeyboardInterrupt) so `finally` blocks run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _raise_terminated)
    if previous[signal.SIGINT] in (signal.SIG_IGN, None):
        pass  # leave an ignored Ctrl-C ignored
    elif previous[signal.SIGINT] is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def _signals_deferred():
    """Hold SIGTERM / SIGINT until the block ends (the swap of old and new OUT is not interrupted)."""
    sigs = {signal.SIGTERM, signal.SIGINT}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _swap_in(new: Path, target: Path):
    """Rename old OUT aside, rename new in, delete old: old or new OUT is whole at every moment."""
    with _signals_deferred():
        if os.path.lexists(target):
            old = target.parent / f".{target.name}.old.{os.getpid()}.{secrets.token_hex(4)}"
            os.rename(target, old)
            try:
                os.rename(new, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(new, target)


def prepare_output(out, force: bool = False, sources: Iterable = ()) -> Path:
    """The checks `atomic_output` makes, for callers that want to fail before doing any work."""
    target = check_location(out, sources)
    check_replaceable(out, target, force)
    return target


@contextmanager
def atomic_output(out, force: bool = False, sources: Iterable = (), what: str = "output",
                  details: Optional[dict] = None) -> Iterator[Path]:
    """A temporary directory (with the marker) that becomes OUT only if the block succeeds (module docstring)."""
    sources = list(sources)
    target = prepare_output(out, force, sources)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    with _cleanup_on_signals():
        tmp = target.parent / f".{target.name}.partial.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            write_marker(tmp, what, **(details or {}))
            yield tmp
            record_files(tmp)
            check_replaceable(out, target, force)  # nothing new appeared at OUT meanwhile
            _swap_in(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def claim_dir(out, sources: Iterable = (), what: str = "output") -> Path:
    """OUT as a folder this project writes into in place (`train --out`): new, empty, or ours; marked.

    Nothing in it is replaced here; its subfolders are written with `atomic_output`.
    """
    target = check_location(out, sources)
    if target.exists() and not (written_by_us(target) or is_empty_dir(target) or _legacy_run(target)):
        raise UnsafeOutputError(f"{out} holds files mlx-redrafter did not write: remove them yourself or "
                                "choose another output folder")
    target.mkdir(parents=True, exist_ok=True)
    if not _marker_ok(target):
        write_marker(target, what)
    return target


def _legacy_run(path: Path) -> bool:
    """A `train --out` folder from before the marker: only data/, checkpoint/, drafter/, training.json."""
    names = {p.name for p in path.iterdir()}
    return bool(names & {"checkpoint", "drafter", "training.json"}) and names <= {"data", "checkpoint", "drafter",
                                                                                     "training.json"}


# ---- files ----

def check_folders_above(path, what: str = "the output", try_making: bool = False):
    """Refuse (UnsafeOutputError) a path under an existing file: it could only fail once the work is done.
    try_making: also make the missing folders above `path` and remove them again, so one that cannot be
    made fails in one line now, not after the run (and nothing is left if the run is refused later)."""
    missing, folder = [], Path(os.path.abspath(Path(path).expanduser())).parent
    while not os.path.exists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise UnsafeOutputError(f"{folder} is a file, not a folder, so {what} cannot go under it: "
                                "choose another output folder")
    if try_making:
        _make_and_remove(missing)


def _make_and_remove(missing: list):
    """Make the folders (deepest last), then remove those made; UnsafeOutputError when one cannot be made."""
    try:
        for made in reversed(missing):
            made.mkdir()
    except OSError as e:
        raise UnsafeOutputError(f"cannot create the folder {missing[0]} ({e.strerror or e}): choose another --out") from None
    finally:
        for made in missing:
            if made.is_dir() and not made.is_symlink():
                try:
                    made.rmdir()
                except OSError:
                    pass


def check_new_files(paths: Iterable, force: bool):
    """Refuse (FileExistsError) before anything is written if a result file exists and force is off."""
    for path in paths:
        path = Path(path)
        check_folders_above(path, path.name, try_making=True)
        if os.path.lexists(path) and (path.is_dir() and not path.is_symlink()):
            raise UnsafeOutputError(f"{path} is a folder, not a file: choose another --out")
        if os.path.lexists(path) and not force:
            raise FileExistsError(f"{path} already exists: pass --force to replace it, or choose another --out")


def check_writable_file(path, option: str = "--out"):
    """Refuse (ValueError) a file path whose folder (or, not made yet, its first existing parent) cannot take
    a new file, found by making and removing one there:
    permissions, read-only mounts and pseudo-filesystems (/proc) all show, before any work is done."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:  # folders still to be made: their first existing parent
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{Path(path).name}.probe.", dir=folder)
    except OSError as e:
        raise ValueError(f"cannot write in {folder} ({e.strerror or e}): choose another {option}") from None
    os.close(fd)
    os.unlink(probe)


def sweep_stale_files(path: Path):
    """Remove the `.NAME.partial.*` files that a killed run (whose pid is gone) left beside `path`."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.partial\.(\d+)\.[0-9a-f]+$")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        m = pattern.match(p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
        except OSError:
            pass


@contextmanager
def atomic_file(path) -> Iterator[Path]:
    """A temporary file beside `path` that replaces it (os.replace) only if the block succeeds.

    SIGTERM and Ctrl-C remove the temporary file; stale ones that killed runs left are swept first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_files(path)
    with _cleanup_on_signals():
        tmp = path.parent / f".{path.name}.partial.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def write_file(path, data: Union[str, bytes]) -> Path:
    """Write text or bytes to `path` atomically (temp file, then os.replace)."""
    with atomic_file(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)
