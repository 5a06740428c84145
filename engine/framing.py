"""Whether weight and state files are whole, judged from their own framing without loading them. A save cut
by a crash or a power loss (nothing forces its data to disk in order, so a marker written last can still
land before a weight file's end), or a copy cut short, otherwise fails deep inside loading with a message
that names no file. Light: a look at a checkpoint must not import torch."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

# What a model folder holds its weights in, whole or sharded (an index naming its shards).
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # a LoRA run's checkpoints hold only these
INDEX_SUFFIX = ".index.json"


def safetensors_damage(path: Path) -> str | None:
    """Why a safetensors file is not whole: its header declares where every tensor ends, and the file must
    end exactly there (the loader refuses one longer or shorter)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length)) if 8 + length <= size else None
        if not isinstance(header, dict):
            return f"{path.name}: no complete header"
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror or err})"
    except (ValueError, KeyError, TypeError, IndexError, struct.error):
        return f"{path.name}: no readable header"
    if size != 8 + length + end:
        return f"{path.name} holds {size:,} bytes, its header says {8 + length + end:,}"
    return None


def torch_file_damage(path: Path) -> str | None:
    """Why a torch.save file (a zip archive) is not whole: its central directory, written last, must be there
    and every entry it lists must lie inside the file."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror or err})"
    except (zipfile.BadZipFile, ValueError, EOFError):
        return f"{path.name} is not a whole torch file (no zip directory at its end)"
    for entry in entries:
        if entry.header_offset + entry.compress_size > size:
            return f"{path.name} is not a whole torch file ({entry.filename} runs past its end)"
    return None


def file_damage(path: Path) -> str | None:
    """`safetensors_damage` or `torch_file_damage` by the file's kind; None for other files."""
    if path.suffix == ".safetensors":
        return safetensors_damage(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        return torch_file_damage(path)
    return None


def index_shards(index: Path) -> tuple[list[Path], str | None]:
    """The shard files a sharded model's index names, and why it cannot be followed (unreadable, or naming a
    shard that is not beside it), else None."""
    try:
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [], f"{index.name} cannot be read ({err})"
    gone = [name for name in names if not (index.parent / name).is_file()]
    why = f"{index.name} names {gone[0]}, which is not there" if gone else None
    return [index.parent / name for name in names], why


def missing_shards(index: Path) -> str | None:
    """Why a sharded model's index cannot be followed (see `index_shards`), or None."""
    return index_shards(index)[1]
