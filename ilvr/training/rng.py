"""RNG states of python, numpy, torch CPU and CUDA: saved as JSON-safe values (checkpoints' rank<r>.json),
restored, or seeded from a derived seed (ranks a checkpoint has no state for: elastic resume)."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import random
from typing import Any

import torch

log = logging.getLogger(__name__)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(bytes(t.cpu().tolist())).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy (if installed), torch CPU and CUDA, as JSON-safe values."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": _b64(torch.get_rng_state())}
    if importlib.util.find_spec("numpy"):
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA only when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_unb64(state["torch"]))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
    elif cuda:
        log.warning("%d CUDA RNG states saved, %d devices here: not restored", len(cuda), torch.cuda.device_count())


def derived_seed(step: int, rank: int) -> int:
    """A seed for a rank the checkpoint has no RNG state for, the same on every run."""
    return int.from_bytes(hashlib.sha256(f"ilvr-elastic/{step}/{rank}".encode()).digest()[:8], "little")


def seed_all(seed: int) -> None:
    """Seed python, torch (CPU and every CUDA device) and numpy (if installed) from one seed."""
    random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % (1 << 32))
    except ImportError:
        pass
