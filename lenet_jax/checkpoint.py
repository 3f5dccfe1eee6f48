"""Checkpoints of a run folder: one msgpack state and one JSON metadata file per epoch.

``checkpoints/epoch_NNN.msgpack`` holds the train state (params, optimizer state, step, key), written
atomically; ``checkpoints/epoch_NNN.json`` holds the model config, normalization, epoch, metrics and
the sha256 of the msgpack, written atomically *after* it. The JSON is the commit marker: a checkpoint
counts only when its JSON exists and the state's hash matches, so a process killed at any moment
leaves the previous checkpoint usable. The JSON carries a checksum of its own content and the state's
hash, so an edited JSON (another model, another learning rate) is refused rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from flax import serialization

from lenet_jax.data import get_dataset
from lenet_jax.io import atomic_write_bytes, atomic_write_json, remove_orphans
from lenet_jax.models import build_model, describe, model_config

_NAME = re.compile(r"epoch_(\d+)\.json$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the requested model."""


def save_checkpoint(run_dir: str | Path, state, metadata: dict[str, Any]) -> Path:
    """Writes the state and metadata of epoch ``metadata["epoch"]``; returns the JSON path.

    With several processes (``jax.distributed``), only process 0 writes; the state is replicated.
    """
    import jax

    ckpt_dir = Path(run_dir) / "checkpoints"
    epoch = int(metadata["epoch"])
    payload = serialization.to_bytes(
        {
            "params": state.params,
            "opt_state": state.opt_state,
            "step": state.step,
            "key": _key_data(state.key),
        }
    )
    json_path = ckpt_dir / f"epoch_{epoch:03d}.json"
    if jax.process_index() != 0:
        return json_path
    state_path = atomic_write_bytes(ckpt_dir / f"epoch_{epoch:03d}.msgpack", payload)
    meta = {
        **metadata,
        "state_file": state_path.name,
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    meta = json.loads(json.dumps(meta))  # the checksum is of what a reader will load
    return atomic_write_json(json_path, {**meta, "checksum": _checksum(meta)})


def _checksum(meta: dict[str, Any]) -> str:
    """sha256 of the metadata (without its ``checksum``) in canonical JSON; the metadata holds the
    state's sha256, so this covers both files."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _key_data(key):
    import jax

    return (
        jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    )


def latest_checkpoint(run_dir: str | Path, epoch: int | None = None):
    """``(metadata, state_bytes)`` of the newest checkpoint in ``run_dir`` (or of ``epoch``), or
    ``None`` when there is none.

    Checkpoints are written atomically, state first and its JSON last, so a killed process never
    leaves a damaged one: a newest checkpoint that is damaged (truncated or changed bytes, a missing
    state file, an edited JSON) was damaged afterwards, and is refused rather than quietly replaced
    by an older epoch. The message names the file and how to fall back (``--epoch N``).

    Raises:
      CheckpointError: the checkpoint is damaged, or ``epoch`` has none.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    files = _checkpoint_files(ckpt_dir)
    epochs = [int(_NAME.search(p.name).group(1)) for p in files]
    if epoch is not None:
        if epoch not in epochs:
            raise CheckpointError(
                f"{run_dir} has no checkpoint of epoch {epoch}; its epochs are {epochs}"
            )
        files = files[: epochs.index(epoch) + 1]
    if not files:
        return None
    meta_path, earlier = files[-1], epochs[: len(files) - 1]
    fallback = (
        f"pass --epoch {earlier[-1]} to use the previous epoch, or restore it"
        if earlier
        else "restore it, or train again"
    )
    try:
        meta = json.loads(meta_path.read_text())
        state_path = ckpt_dir / meta["state_file"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{meta_path} is damaged ({reason}); {fallback}") from None
    if "checksum" in meta and meta["checksum"] != _checksum(meta):
        raise CheckpointError(
            f"{meta_path} was changed after it was written (its checksum does not match); "
            f"{fallback}"
        )
    try:
        payload = state_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{state_path} cannot be read ({e.strerror}); {fallback}") from None
    if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
        raise CheckpointError(
            f"{state_path} is damaged (its sha256 does not match {meta_path.name}); {fallback}"
        )
    return meta, payload


def _checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """The ``epoch_NNN.json`` files of ``ckpt_dir``, oldest epoch first."""
    found = [
        (int(m.group(1)), p) for p in ckpt_dir.glob("epoch_*.json") if (m := _NAME.search(p.name))
    ]
    return [p for _, p in sorted(found)]


def remove_unfinished(run_dir: str | Path) -> list[Path]:
    """Removes what a process killed mid-checkpoint left in ``run_dir``: temporary files, and state
    files whose JSON (the commit marker) was never written. Returns them. Hold the run's lock."""
    removed = remove_orphans(run_dir)
    ckpt_dir = Path(run_dir) / "checkpoints"
    for state in ckpt_dir.glob("epoch_*.msgpack"):
        if not state.with_suffix(".json").exists():
            state.unlink()
            removed.append(state)
    return removed


def restore_state(template, payload: bytes, metadata: dict[str, Any], expected_model: dict):
    """Fills ``template`` (a fresh train state of ``expected_model``) from checkpoint bytes.

    Raises:
      CheckpointError: the checkpoint holds another architecture than ``expected_model``.
    """
    check_model(metadata, expected_model)
    import jax

    target = {
        "params": template.params,
        "opt_state": template.opt_state,
        "step": template.step,
        "key": _key_data(template.key),
    }
    try:
        restored = serialization.from_bytes(target, payload)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint does not fit {describe(expected_model)}: {e}") from None
    key = restored["key"]
    if jax.dtypes.issubdtype(template.key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return template.replace(
        params=restored["params"], opt_state=restored["opt_state"], step=restored["step"], key=key
    )


def check_model(metadata: dict[str, Any], expected_model: dict) -> None:
    """Raises ``CheckpointError`` naming both models when the checkpoint's model differs."""
    found = metadata.get("model")
    try:  # fill in attributes added since the checkpoint was written with their defaults
        found = model_config(build_model(found))
    except (TypeError, ValueError):
        pass
    if found != expected_model:
        raise CheckpointError(
            f"checkpoint holds {describe(found or {})} but {describe(expected_model)} was requested"
        )


def load_params(run_dir: str | Path, epoch: int | None = None):
    """The model, params and metadata of the newest checkpoint in ``run_dir`` (or of ``epoch``),
    for inference.

    Returns:
      ``(model, params, metadata)``; ``params`` is the ``"params"`` collection, and
      ``metadata["dataset"]`` the dataset the run trained on (``run_dataset``).

    Raises:
      CheckpointError: no checkpoint in ``run_dir``, or a damaged one (``latest_checkpoint``).
    """
    found = latest_checkpoint(run_dir, epoch)
    if found is None:
        raise CheckpointError(f"no checkpoint in {run_dir}")
    meta, payload = found
    try:
        model = build_model(meta["model"])
        meta = {**meta, "dataset": run_dataset(meta)}
        get_dataset(meta["dataset"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir}: the checkpoint names no valid model ({e})") from None
    params = _as_jax(serialization.msgpack_restore(payload)["params"])
    _check_shapes(model, params, meta["dataset"], run_dir)
    return model, params, meta


def run_dataset(metadata: dict[str, Any]) -> str:
    """The dataset a run trained on, as its checkpoint records it (runs written before the model
    config lost its ``dataset`` also name it there)."""
    return metadata.get("dataset") or metadata.get("model", {}).get("dataset", "mnist")


def _check_shapes(model, params, dataset, run_dir) -> None:
    """Raises ``CheckpointError`` unless ``params`` has exactly the shapes ``model`` creates for
    ``dataset``'s images."""
    import jax

    from lenet_jax.models import init_params

    expected = jax.eval_shape(lambda: init_params(model, jax.random.key(0), dataset))

    def shapes(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in leaves}

    if shapes(expected) != shapes(params):
        raise CheckpointError(
            f"{run_dir}: the weights do not fit {describe(model_config(model))} named in the "
            "checkpoint's JSON; it was edited or comes from another run"
        )


def _as_jax(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(jnp.asarray, tree)
