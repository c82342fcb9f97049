"""A loader stopped after some batches, its state serialised, a new loader resumed from it:
the one resume path the data tests share."""
from __future__ import annotations

import json
from typing import Callable


def fingerprint(batch: dict) -> tuple:
    """What identifies a batch: its keys, its pixels' sum, its region boxes."""
    return (tuple(batch["keys"]), round(float(batch["images"].double().sum()), 6),
            tuple(batch["region_boxes"].flatten().tolist()))


def stop_and_resume(build: Callable, stop: int, fingerprint: Callable) -> tuple[list, dict, object]:
    """(fingerprints of the first `stop` batches then of the rest of the epoch after a resume,
    the serialised state at the stop, the resumed loader). ``build()`` makes a fresh loader."""
    loader = build()
    got = []
    for batch in loader:
        got.append(fingerprint(batch))
        if len(got) == stop:
            break
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint keeps
    resumed = build()
    resumed.load_state_dict(state)
    got += [fingerprint(batch) for batch in resumed]
    return got, state, resumed
