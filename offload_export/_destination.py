"""What a destination may be, decided before anything is written: never what the model reads, never the
current directory or a mount point, and with ``overwrite`` only a directory that holds a checkpoint.

``overwrite=True`` replaces an empty directory or one that holds nothing but checkpoint files
(:data:`CHECKPOINT_FILES`: what this package's exports write, what ``save_pretrained`` writes for a model, its
tokenizer and processor, and the model card files of a Hub download). Anything else in it (a subdirectory, a
file we would never write) means the directory is not a checkpoint: the export is refused with a
``ValueError`` that lists what would be lost. Symlinks inside count by their names (removing them never
touches their targets).

A mount point is refused: the export commits by renaming a complete staging directory over the destination,
which a mount point does not allow, and staging inside it could not be committed in one step (a crash part
way would leave a half-moved checkpoint at the destination). A folder inside the mount point works.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CHECKPOINT_FILES", "check_destination", "check_replaceable", "foreign_entries", "is_mount_point",
           "resolve_destination"]

#: File names (``fnmatch`` patterns, matched case-sensitively) that a checkpoint directory consists of.
CHECKPOINT_FILES = (
    # weights and their indexes: every export format, save_pretrained, older torch checkpoints
    "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
    # configuration: transformers, ModelOpt, llm-compressor, and this package's opt-in vLLM state
    "config.json", "generation_config.json", "hf_quant_config.json", "vllm_fq_modelopt_state.pth", "recipe.yaml",
    # tokenizers and processors (save_pretrained)
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    # a Hub download's model card and attributes
    "README.md", ".gitattributes",
)

_LISTED = 10  # names quoted in an error; the rest are counted
_OCTAL = re.compile(rb"\\([0-7]{3})")  # mountinfo's escapes: \040 for a space, ...


def resolve_destination(out_dir: str | os.PathLike) -> Path:
    """The directory a checkpoint for ``out_dir`` is written to: absolute, every symlink followed.

    A symlink (also a dangling one) stands for its target: the checkpoint lands there and the link stays.

    Args:
        out_dir: the destination the user named.

    Returns:
        The resolved path.

    Raises:
        ValueError: ``out_dir`` is the empty string (an unset environment variable, say), which would mean
            the current directory.
    """
    if os.fspath(out_dir) == "":
        raise ValueError("out_dir is empty (an unset variable?); name the checkpoint directory to write, "
                         "e.g. 'out/model'")
    return Path(os.path.realpath(os.path.abspath(out_dir)))


def _named(out_dir: str | os.PathLike, target: Path) -> str:
    return str(out_dir) if Path(os.path.abspath(out_dir)) == target else f"{out_dir} (-> {target})"


def _listing(names: list[str]) -> str:
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f" and {more} more" if more > 0 else "")


def foreign_entries(directory: Path) -> list[str]:
    """What in ``directory`` is not part of a checkpoint, sorted (subdirectories end in ``/``).

    Args:
        directory: an existing directory.

    Returns:
        The names that are neither :data:`CHECKPOINT_FILES` nor symlinks or regular files named so.
    """
    foreign = []
    with os.scandir(directory) as entries:
        for entry in entries:
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                foreign.append(entry.name + "/")
            elif not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)) \
                    or not any(fnmatch.fnmatchcase(entry.name, p) for p in CHECKPOINT_FILES):
                foreign.append(entry.name)
    return sorted(foreign)


def check_replaceable(out_dir: str | os.PathLike, target: Path) -> None:
    """Raise unless ``target`` (an existing directory) holds nothing but a checkpoint.

    Args:
        out_dir: the destination as the user named it (for the message).
        target: the resolved destination.

    Raises:
        ValueError: ``target`` holds files or directories that are not part of a checkpoint; they are listed.
    """
    foreign = foreign_entries(target)
    if foreign:
        raise ValueError(f"cannot replace {_named(out_dir, target)}: overwrite=True replaces only an empty directory "
                         f"or one holding nothing but a checkpoint, and these would be lost: {_listing(foreign)}; "
                         f"move them away or choose another destination")


def _check_sources(out_dir: str | os.PathLike, target: Path, protected: Iterable[str | os.PathLike]) -> None:
    """Raise ValueError when ``target`` is, or contains, a file or folder the model reads its weights from."""
    for source in protected:
        real = resolve_destination(source)
        if real == target or target in real.parents:
            relation = "is" if real == target else "contains"
            raise ValueError(f"cannot export into {_named(out_dir, target)}: it {relation} {_named(source, real)}, "
                             f"which the model reads its offloaded weights from, and exporting there would replace "
                             f"them; choose a destination that does not contain it (a new folder inside an offload "
                             f"folder is fine)")


def _mount_points() -> set[str]:
    """Mount points listed in /proc/self/mountinfo (also bind mounts on the same file system); empty without it."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    fields = (line.split(b" ") for line in lines)
    return {os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m[1], 8)]), f[4])) for f in fields if len(f) > 4}


def is_mount_point(path: Path) -> bool:
    """Whether the directory ``path`` is a mount point (its own file system, or a bind mount)."""
    return os.path.ismount(path) or str(path) in _mount_points()


def _check_place(out_dir: str | os.PathLike, target: Path) -> None:
    """Refuse the current directory (or one containing it), a file system root and a mount point."""
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == cwd or target in cwd.parents:
        relation = "is" if target == cwd else "contains"
        raise ValueError(f"cannot export into {_named(out_dir, target)}: it {relation} the current working "
                         f"directory, which the export would replace as a whole; name a new folder for the "
                         f"checkpoint, e.g. {os.path.join(out_dir, 'checkpoint')}")
    if target.is_dir() and (target.parent == target or is_mount_point(target)):
        raise ValueError(f"cannot export into {_named(out_dir, target)}: it is a mount point, and the export "
                         f"commits by renaming the finished checkpoint over the destination, which a mount point "
                         f"does not allow; export into a folder inside it, e.g. {target / 'checkpoint'}")


def check_destination(out_dir: str | os.PathLike, *, overwrite: bool,
                      protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Fail early, before anything is written, on a destination that cannot or must not be written.

    Args:
        out_dir: the destination directory; a symlink stands for its target.
        overwrite: whether a directory that holds a checkpoint may be replaced.
        protected: files and folders the model reads its weights from (offload folders, the source
            checkpoint's safetensors files: ``offload_export.layout(model).source_paths()``).

    Returns:
        The resolved destination (see :func:`resolve_destination`), where the checkpoint will be.

    Raises:
        ValueError: the destination is empty (``""``), is or contains one of ``protected``, is or contains the
            current directory, is a mount point, or (with ``overwrite``) holds more than a checkpoint.
        FileExistsError: the destination is a file, or a non-empty directory and ``overwrite`` is false.
        PermissionError: the nearest existing ancestor directory is not writable.
    """
    target = resolve_destination(out_dir)
    _check_sources(out_dir, target, protected)
    _check_place(out_dir, target)
    if (target.exists() or target.is_symlink()) and not target.is_dir():
        raise FileExistsError(f"{_named(out_dir, target)} exists and is not a directory; choose another destination")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{_named(out_dir, target)} is not empty; pass overwrite=True to replace it once "
                                  f"the new checkpoint is complete, or choose another destination")
        check_replaceable(out_dir, target)
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    effective = os.access in os.supports_effective_ids  # a setuid/seteuid process is judged by its euid
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=effective):
        raise PermissionError(f"cannot write into {parent}: permission denied; choose a writable destination")
    return target
