"""Safe writes: temporary path then rename, locks on shared files, memoized content hashes, and the clean-up of
what a killed process left half-done."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from slmops.config import home
from slmops.errors import SlmopsError
from slmops.host.isolate import refuse_while_bootstrapping


def lock(path: Path, timeout: float = 600) -> FileLock:
    """An inter-process lock beside path (path + '.lock'). Refused in a spawned child still importing its parent's
    script (isolate.refuse_while_bootstrapping): there it would wait on the lock its parent holds."""
    refuse_while_bootstrapping()
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=timeout)


FICLONE = 0x40049409  # Linux ioctl: share the blocks, copy on write (btrfs, XFS)


def copy_file(src: str | Path, dst: str | Path) -> str:
    """dst as src's own copy: a reflink where the filesystem offers one, else the bytes. Never a hard link: an
    edit in one place must not change another, and onnx.load refuses files with several links."""
    try:
        import fcntl  # Unix only

        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        shutil.copystat(src, dst)
    except (ImportError, OSError):
        shutil.copy2(src, dst)
    return str(dst)


def regular_files(folder: Path, skip: tuple[str, ...] = (), follow_links: bool = False) -> list[Path]:
    """Every file below folder (names in skip left out, at any depth), after checking that each entry is a plain file
    or folder: a symbolic link (it could lead out of the folder, to /etc/passwd or /dev/zero) or a device, pipe or
    socket is refused with one line naming it. Copies and hashes of model folders walk through here. follow_links
    lets links to regular files through (a source read in place, such as a Hugging Face cache snapshot, whose files
    are links to its blobs), never links to anything else."""
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in [*dirs, *names]:
            path = Path(root) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) and follow_links and path.is_file() and name in names:
                mode = path.stat().st_mode
            if stat.S_ISLNK(mode):
                raise SlmopsError(
                    f"{path} is a symbolic link (to {os.readlink(path)}); slmops copies only the folder's own files: "
                    "put the file itself there, or remove the link"
                )
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise SlmopsError(f"{path} is not a regular file (a device, pipe or socket); remove it from {folder}")
        files += [Path(root) / n for n in sorted(names) if n not in skip]
    return sorted(files)


def copy_tree(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """Fill target with copies of source's files (names in skip left out, at any depth). Links and special files
    are refused (regular_files), so a copy never leaves the folder and never reads without end."""
    source = Path(source)
    for f in regular_files(source, skip):
        dst = Path(target) / f.relative_to(source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        copy_file(f, dst)


def strict_json(data: Any) -> Any:
    """data with every NaN or infinite float replaced by None: JSON has no NaN, and a parser that follows the
    standard refuses Python's bare NaN."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON record slmops wrote (a deploy record, a remembered job), {} where it is missing or damaged."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside path, then rename: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# Temporary names carry the pid of the process that made them, so a later run can tell a dead process's leftovers
# from a live one's work: .NAME.partial-PID-xxxx (being written), .NAME.old-PID (being replaced), .work-PID-xxxx.
STALE_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)(-.*)?$|^\.work-(?P<wpid>\d+)-")


FAULT_ENV = "SLMOPS_FAULT_AT"


def fault_point(name: str, once: Path | None = None) -> None:
    """Die here with SIGKILL when $SLMOPS_FAULT_AT names this point: how tests prove that a kill at the worst
    moment of a replacement loses nothing. once: a file marking that it died here before (then it goes on). A no-op
    otherwise."""
    if os.environ.get(FAULT_ENV) == name:
        import signal

        if once is not None:
            if once.exists():
                return
            once.parent.mkdir(parents=True, exist_ok=True)
            once.touch()

        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def pid_alive(pid: int) -> bool:
    # psutil, not os.kill(pid, 0): on Windows that call terminates the process instead of probing it.
    import psutil

    return pid > 0 and (pid == os.getpid() or psutil.pid_exists(pid))


def clean_stale(folder: Path) -> list[str]:
    """Remove what killed processes left in folder: half-written folders go; a folder caught between the two
    renames of a replacement (old moved aside, new not yet in) is put back. Returns what was done."""
    done: list[str] = []
    if not folder.is_dir():
        return done
    for path in sorted(folder.iterdir()):
        m = STALE_RE.match(path.name)
        if not m or pid_alive(int(m.group("pid") or m.group("wpid"))):
            continue
        final = folder / m.group("name") if m.group("name") else None
        if m.group("kind") == "old" and final is not None and not final.exists():
            os.replace(path, final)
            done.append(f"restored {final}")
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        done.append(f"removed {path}")
    return done


def clean_home() -> None:
    """clean_stale over slmops's own cache folders: run at the start of every command, so nothing a killed
    command left survives the next one."""
    for area in ("builds", "staged", "sources", "deploys", "quality"):
        clean_stale(home() / area)


def scratch_dir(parent: Path) -> tempfile.TemporaryDirectory:
    """Scratch space beside the cache, named so that clean_stale removes it if this process is killed."""
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=parent, prefix=f".work-{os.getpid()}-")


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty folder beside final; on success it replaces final (two renames, which clean_stale can
    finish or undo after a kill), on failure it is removed and final is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-{os.getpid()}-"))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rename(source: Path, target: Path) -> None:
    """os.replace, with a clear error where a running program holds the files (Windows refuses to move a folder
    while a runtime has a model in it open)."""
    try:
        os.replace(source, target)
    except PermissionError as e:
        raise SlmopsError(
            f"cannot move {source} to {target}: a file is in use or read-only ({e.filename or source}); "
            "stop what is using the model (a running `slmops serve` or chat) and try again"
        ) from None


def replace_dir(new: Path, final: Path) -> None:
    """Put folder new at final; an existing final is moved aside first and deleted once new is in."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        rename(final, old)
        fault_point("replace:moved-aside")
        try:
            rename(new, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        rename(new, final)


def human_bytes(n: float) -> str:
    """A size as people read it: 512 B, 1.5 KB, 271.3 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def check_disk(folder: Path, need: int, what: str) -> None:
    """Refuse to start work that would run out of disk half-way; builds and sources live under SLMOPS_HOME."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SlmopsError(
            f"too little disk for {what} at {folder}: {human_bytes(free)} free, about {human_bytes(need)} needed; "
            "free space, or set SLMOPS_HOME to a folder on a disk with more room"
        )


def dir_size(path: Path) -> int:
    """Bytes of the folder's own files (links are not followed)."""
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class HashMemo:
    """sha256 of files, remembered by device, inode, size, mtime and ctime: an unchanged file costs a stat, an edited
    one is read again. ctime is in the key because mtime is not proof: a file rewritten in place with its size and
    mtime put back (`touch -d`) still gets a new ctime, which no program can set back."""

    def __init__(self) -> None:
        self.path = home() / "hash-memo.json"
        try:
            self.memo = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.memo = {}
        self.changed = False

    def __call__(self, f: Path) -> str:
        st = f.stat()
        key = f"{st.st_dev}:{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        digest = self.memo.get(key)
        if digest is None:
            digest = self.memo[key] = _hash_file(f)
            self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            with lock(self.path):
                write_json_atomic(self.path, self.memo)


def file_hashes(folder: Path, skip: tuple[str, ...] = (), follow_links: bool = False) -> dict[str, str]:
    """{relative path: sha256} of a folder's files, hidden files and names in skip left out (regular_files refuses
    links and special files; follow_links as there)."""
    memo = HashMemo()
    files = [p for p in regular_files(folder, skip, follow_links) if not p.name.startswith(".")]
    hashes = {f.relative_to(folder).as_posix(): memo(f) for f in files}
    memo.save()
    return hashes


def changed_files(folder: Path, recorded: dict[str, str]) -> list[str]:
    """The files of recorded (from file_hashes) that are missing from folder or differ now. Only those are read:
    other files there (a user's evaluations beside an -o build) cost nothing."""
    memo = HashMemo()
    changed = sorted(
        rel for rel, digest in recorded.items() if not (folder / rel).is_file() or memo(folder / rel) != digest
    )
    memo.save()
    return changed


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents)."""
    path = path.resolve()
    if path.is_file():
        memo = HashMemo()
        hashes = {path.name: memo(path)}
        memo.save()
    elif path.is_dir():
        hashes = file_hashes(path, follow_links=True)  # a source read in place: links to its own files are fine
    else:
        raise SlmopsError(f"{path} is neither a file nor a folder; give a model folder or a .gguf file")
    total = hashlib.sha256()
    for rel, digest in hashes.items():
        total.update(rel.encode() + b"\0" + digest.encode())
    return total.hexdigest()


def record_files(folder: Path, record: str, skip: tuple[str, ...] = ()) -> None:
    """Write folder/record: {"files": file_hashes(folder)}, the files as they are now (the record itself, hidden
    files and names in skip left out), for changed_since_record to compare with later."""
    write_json_atomic(folder / record, {"files": file_hashes(folder, skip=(record, *skip))})


def changed_since_record(folder: Path, record: str) -> list[str] | None:
    """The files of folder/record (record_files) missing or different now, [] when all are as recorded; None where
    there is no record. A damaged record, or a file replaced by a link or a device, counts as changed. Content
    decides, a stat each while unchanged (HashMemo)."""
    try:
        recorded = json.loads((folder / record).read_text())["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return [record]
    if not isinstance(recorded, dict) or not recorded:
        return [record]
    try:
        return changed_files(folder, recorded)
    except SlmopsError as e:
        return [str(e)]


SEAL = ".slmops-files.json"  # in a folder of slmops's own cache: its files' sha256 when it was made


def seal(folder: Path) -> None:
    """Record a cache folder's files, so a later use can tell it is still what was made."""
    record_files(folder, SEAL)


def sealed_intact(folder: Path) -> bool:
    """A cache folder made and sealed by slmops whose files are all as they were. A folder that is missing,
    unsealed or changed is not."""
    return changed_since_record(folder, SEAL) == []
