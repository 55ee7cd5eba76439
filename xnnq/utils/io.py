"""Reading weights files: state dicts only, with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

from pathlib import Path

import torch


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved as a plain dict or under ``state_dict`` (keys may carry ``module.``).

    Loads with ``weights_only=True``: a file holding pickled code is refused (``ValueError``), as is a file
    that does not hold a dict of tensors; a missing file raises ``FileNotFoundError``.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle with code, or not a torch file
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"{path}: not a loadable weights file with weights_only=True ({type(e).__name__}: {first}). "
            "Save it with torch.save(model.state_dict(), path)."
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: holds a {type(obj).__name__}, not a state dict of tensors. "
            "Save it with torch.save(model.state_dict(), path)."
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}
