"""Whether a hub id that is not a local path can be had, asked once with a short timeout before a run starts.

Left to `from_pretrained`, an unreachable hub costs about a minute of retries and a hundred-line traceback
after the run is registered; asked here, it is one line and exit 2 with nothing registered.
"""

from __future__ import annotations

HUB_TIMEOUT_S = 10.0


def hub_problem(repo_id: str, kind: str = "model") -> str | None:
    """Why `repo_id` cannot be loaded from the Hugging Face hub (or its local cache), or None if it can.

    `kind` is "model" or "dataset"."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    probe = "config.json" if kind == "model" else "README.md"
    if isinstance(try_to_load_from_cache(repo_id, probe, repo_type=kind), str):
        return None  # cached: loads without the network
    if constants.HF_HUB_OFFLINE:
        return f"{_not_here()} and not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    api = HfApi()
    info = api.model_info if kind == "model" else api.dataset_info
    try:
        info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # exists; the token decides, and from_pretrained says so clearly
    except RepositoryNotFoundError:
        return f"{_not_here()}, and the hub has no {kind} {repo_id!r} (or it is private)"
    except Exception as err:  # connection errors come from several HTTP libraries
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        return f"{_not_here()}, and the Hugging Face hub cannot be reached ({reason})"
    return None


def _not_here() -> str:
    # A recipe copied elsewhere keeps paths that were relative to where it was first run.
    from pathlib import Path

    return f"is no folder under {Path.cwd()} (recipe paths are relative to the current directory)"
