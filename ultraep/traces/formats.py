"""Routing trace formats and their loaders.

Two kinds of trace reach the library:

- :class:`TokenTrace`: the logical experts each token picked at each MoE layer (``topk_ids``). Any
  grouping of tokens into ranks and microbatches can be formed from it (see ``ultraep.traces.slicing``).
- :class:`LoadTrace`: per-expert assignment counts only, either one row per forward step of a whole EP
  group (``kind="step_loads"``) or one row per corpus (``kind="aggregate"``). These carry no source
  rank, so a load matrix built from them is an even split (see ``step_loads_to_matrices``).

On disk a trace is a ``.npz`` file with a scalar ``kind`` field (``"token"``, ``"step_loads"`` or
``"aggregate"``) and scalar ``model``, ``source``, ``num_experts``, ``top_k`` fields, ``layer_ids``
``[num_layers]`` and one main array: ``topk_ids [num_tokens, num_layers, topk]`` (any integer dtype,
-1 = unused) or ``loads [num_steps, num_layers, num_experts]``. Optional arrays: ``seq_id
[num_tokens]``, ``task_id``/``dataset_id`` with ``task_names``/``dataset_names``, ``licence``.
A ``.npz`` holding only ``topk_ids``, or a plain ``.npy`` array of topk ids ``[num_tokens, num_layers,
topk]`` or ``[num_tokens, topk]``, loads as a token trace when ``num_experts`` is given.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "LOAD_KINDS",
    "TRACE_KINDS",
    "LoadTrace",
    "TokenTrace",
    "bundled_trace_path",
    "load_bundled_trace",
    "load_trace",
]

logger = logging.getLogger(__name__)

TRACE_KINDS = ("token", "step_loads", "aggregate")
"""Values of the ``kind`` field a trace file may carry."""
LOAD_KINDS = ("step_loads", "aggregate")
"""Kinds that load as a :class:`LoadTrace`."""

UNKNOWN_LICENCE = "unknown"

NUM_EXPERTS_HINT = "pass num_experts=<experts per layer> to load_trace"
"""Fix that load_trace's errors name for a file without num_experts. The CLIs replace it with their flag."""

# Licences of the public repositories that published the real traces this project evaluates on,
# keyed by the repository prefix of a trace's ``source`` field. A ``licence`` field in the file wins.
_SOURCE_LICENCES = {
    "github.com/deepseek-ai/ESFT": "MIT (code licence of the deepseek-ai/ESFT repository, (c) 2023 DeepSeek)",
    "github.com/allenai/OLMoE": "Apache-2.0 (allenai/OLMoE repository)",
    "github.com/sacs-epfl/HarMoEny": (
        "none: the sacs-epfl/HarMoEny repository has no licence; use for internal evaluation only and "
        "do not redistribute"
    ),
}

_BUNDLED_FILE = "esft_dsv2lite_token_routing.npz"


@dataclasses.dataclass(frozen=True, eq=False)
class TokenTrace:
    """Per-token routing decisions of one model over a sequence of tokens.

    Tokens are in recording order; sequences (``seq_ids``) occupy contiguous runs in the traces
    this project ships, but no function relies on that.
    """

    topk_ids: torch.Tensor
    """[num_tokens, num_layers, topk] int64, CPU. Logical expert picked by each token at each layer, in
    the router's order; -1 = unused entry."""
    num_experts: int
    """Logical experts per MoE layer; every id in ``topk_ids`` is ``-1 .. num_experts-1``."""
    model: str = "unknown"
    """The model that did the routing."""
    source: str = "unknown"
    """Origin of the data: repository, commit and path, or the local file for user traces."""
    layer_ids: list[int] | None = None
    """The model's own index of each entry of the layer axis; ``None`` becomes ``[0, 1, ...]``."""
    seq_ids: torch.Tensor | None = None
    """[num_tokens] int64, CPU, or None. Sequence each token belongs to."""
    licence: str = UNKNOWN_LICENCE
    """Licence under which the trace data was published."""
    dataset_ids: torch.Tensor | None = None
    """[num_tokens] int64, CPU, or None. Index into ``dataset_names`` of the dataset each token came from."""
    dataset_names: tuple[str, ...] = ()
    """Names of the datasets the trace mixes (empty when unknown)."""

    def __post_init__(self) -> None:
        topk_ids = _as_int64_tensor(self.topk_ids, "TokenTrace.topk_ids")
        if topk_ids.dim() != 3:
            raise ValueError(
                f"TokenTrace.topk_ids must have shape [num_tokens, num_layers, topk], got {list(topk_ids.shape)}; "
                "add a layer axis with topk_ids[:, None, :] for a single layer"
            )
        _check_num_experts(self.num_experts, "TokenTrace.num_experts")
        _check_expert_ids(topk_ids, self.num_experts, "TokenTrace.topk_ids")
        object.__setattr__(self, "topk_ids", topk_ids)
        object.__setattr__(self, "layer_ids", _checked_layer_ids(self.layer_ids, topk_ids.shape[1], "TokenTrace"))
        for name in ("seq_ids", "dataset_ids"):
            value = getattr(self, name)
            if value is None:
                continue
            value = _as_int64_tensor(value, f"TokenTrace.{name}")
            if tuple(value.shape) != (topk_ids.shape[0],):
                raise ValueError(
                    f"TokenTrace.{name} must have shape [num_tokens] = [{topk_ids.shape[0]}], got {list(value.shape)}"
                )
            object.__setattr__(self, name, value)
        object.__setattr__(self, "dataset_names", tuple(str(name) for name in self.dataset_names))
        if self.dataset_ids is not None:
            _check_dataset_ids(self.dataset_ids, self.dataset_names, "TokenTrace.dataset_ids")

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def topk(self) -> int:
        return self.topk_ids.shape[2]

    def __repr__(self) -> str:
        return (
            f"TokenTrace(model={self.model!r}, num_tokens={self.num_tokens}, num_layers={self.num_layers}, "
            f"topk={self.topk}, num_experts={self.num_experts}, source={self.source!r})"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class LoadTrace:
    """Per-expert assignment counts, summed over all source ranks of a step or over a whole corpus."""

    loads: torch.Tensor
    """[num_steps, num_layers, num_experts] int64, CPU. ``loads[step, layer, expert]`` counts the
    assignments of all tokens of one step (``kind="step_loads"``) or one corpus (``kind="aggregate"``)
    to a logical expert; entries are >= 0."""
    kind: str
    """``"step_loads"`` (one forward step of a whole EP group per row) or ``"aggregate"`` (one corpus per row)."""
    num_experts: int
    """Logical experts per MoE layer; equals ``loads.shape[2]``."""
    top_k: int
    """Experts each token picked in the recorded model."""
    model: str = "unknown"
    """The model that did the routing."""
    source: str = "unknown"
    """Origin of the data: repository, commit and path."""
    layer_ids: list[int] | None = None
    """The model's own index of each entry of the layer axis; ``None`` becomes ``[0, 1, ...]``."""
    licence: str = UNKNOWN_LICENCE
    """Licence under which the trace data was published."""
    dataset_ids: torch.Tensor | None = None
    """[num_steps] int64, CPU, or None. Index into ``dataset_names`` of the dataset of each row."""
    dataset_names: tuple[str, ...] = ()
    """Names of the datasets the rows come from (empty when unknown)."""

    def __post_init__(self) -> None:
        if self.kind not in LOAD_KINDS:
            raise ValueError(
                f"LoadTrace.kind must be one of {LOAD_KINDS}, got {self.kind!r}; per-token routing is a TokenTrace"
            )

        loads = _as_int64_tensor(self.loads, "LoadTrace.loads")
        if loads.dim() != 3:
            raise ValueError(
                f"LoadTrace.loads must have shape [num_steps, num_layers, num_experts], got {list(loads.shape)}"
            )
        _check_num_experts(self.num_experts, "LoadTrace.num_experts")
        if loads.shape[2] != self.num_experts:
            raise ValueError(
                f"LoadTrace.loads has {loads.shape[2]} experts on its last axis but num_experts={self.num_experts}; "
                "the last axis must index logical experts"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"LoadTrace.top_k must be an int in 1..num_experts={self.num_experts}, got {self.top_k!r}")

        if loads.numel() and int(loads.min()) < 0:
            step, layer, expert = np.unravel_index(int(torch.argmin(loads)), tuple(loads.shape))
            raise ValueError(
                f"LoadTrace.loads[{step}, {layer}, {expert}] = {int(loads.min())} is negative; "
                "a load counts assignments and must be >= 0"
            )
        object.__setattr__(self, "loads", loads)
        object.__setattr__(self, "layer_ids", _checked_layer_ids(self.layer_ids, loads.shape[1], "LoadTrace"))

        if self.dataset_ids is not None:
            dataset_ids = _as_int64_tensor(self.dataset_ids, "LoadTrace.dataset_ids")
            if tuple(dataset_ids.shape) != (loads.shape[0],):
                raise ValueError(
                    f"LoadTrace.dataset_ids must have shape [num_steps] = [{loads.shape[0]}], got {list(dataset_ids.shape)}"
                )
            object.__setattr__(self, "dataset_ids", dataset_ids)
        object.__setattr__(self, "dataset_names", tuple(str(name) for name in self.dataset_names))
        if self.dataset_ids is not None:
            _check_dataset_ids(self.dataset_ids, self.dataset_names, "LoadTrace.dataset_ids")

    @property
    def num_steps(self) -> int:
        return self.loads.shape[0]

    @property
    def num_layers(self) -> int:
        return self.loads.shape[1]

    def __repr__(self) -> str:
        return (
            f"LoadTrace(kind={self.kind!r}, model={self.model!r}, num_steps={self.num_steps}, "
            f"num_layers={self.num_layers}, num_experts={self.num_experts}, top_k={self.top_k}, source={self.source!r})"
        )


def load_trace(path: str | os.PathLike, *, num_experts: int | None = None) -> TokenTrace | LoadTrace:
    """Load a routing trace from a ``.npz`` trace file or a ``.npy`` array of topk ids.

    path: a ``.npz`` file in the trace format described in this module, a ``.npz`` holding only
      ``topk_ids``, or a ``.npy`` integer array of topk ids ``[num_tokens, num_layers, topk]`` or
      ``[num_tokens, topk]`` (one layer); -1 marks unused entries.
    num_experts: logical experts per layer. Required when the file does not store it (``.npy`` files and
      bare ``topk_ids`` archives); when the file stores it, a different value raises ``ValueError``.

    Returns a :class:`TokenTrace` for per-token routing and a :class:`LoadTrace` for ``step_loads`` and
    ``aggregate`` files, with tensors on the CPU in int64. Raises ``FileNotFoundError`` for a missing
    file, ``TypeError`` for non-integer arrays and ``ValueError`` for unknown kinds, wrong shapes and
    expert ids outside ``-1 .. num_experts-1``.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"trace path {str(path)!r} is a folder; pass the path of a .npz trace or a .npy array of topk ids")
    if not path.is_file():
        raise FileNotFoundError(
            f"trace file {str(path)!r} does not exist; pass the path of a .npz trace or a .npy array of topk ids"
        )
    if num_experts is not None:
        _check_num_experts(num_experts, "num_experts")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            trace = _load_npy(path, num_experts)
        elif suffix == ".npz":
            trace = _load_npz(path, num_experts)
        else:
            trace = None
        if trace is not None:
            _check_has_assignments(trace)
            return trace
    except (EOFError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"trace file {str(path)!r} is empty, truncated or not a NumPy file ({error}); write it with numpy.save or numpy.savez"
        ) from error
    except (TypeError, ValueError) as error:
        if "pickled data" in str(error):
            message = "contains pickled objects, which the loader does not run; store plain integer arrays with numpy.savez"
            raise ValueError(f"trace file {str(path)!r} {message}") from error
        raise type(error)(f"trace file {str(path)!r}: {error}") from error
    raise ValueError(
        f"trace file {str(path)!r} has suffix {path.suffix!r}; expected .npz (trace format) or .npy (topk ids array)"
    )


def bundled_trace_path() -> Path:
    """Return the path of the bundled demo trace: DeepSeek-V2-Lite routing recorded by deepseek-ai/ESFT.

    The file contains 33,279 tokens x 26 MoE layers x top 6 of 64 logical experts; ``NOTICE.md`` beside it
    gives its source, commit and licence (MIT).
    """
    return Path(__file__).resolve().parent / "data" / _BUNDLED_FILE


def load_bundled_trace() -> TokenTrace:
    """Load the bundled demo trace (see :func:`bundled_trace_path`) as a :class:`TokenTrace`."""
    path = bundled_trace_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled trace {str(path)!r} is missing from this installation; reinstall ultraep with its "
            "package data, or regenerate it with benchmarks/make_bundled_trace.py"
        )
    trace = load_trace(path)
    if not isinstance(trace, TokenTrace):
        raise RuntimeError(f"the bundled trace {str(path)!r} has kind {trace.kind!r}, expected 'token'; reinstall ultraep")
    return trace


# File readers.


def _load_npy(path: Path, num_experts: int | None) -> TokenTrace:
    array = np.load(path, allow_pickle=False)
    if num_experts is None:
        raise ValueError(
            f"a .npy array of topk ids does not store the number of logical experts; {NUM_EXPERTS_HINT}"
        )
    topk_ids = _topk_ids_from_array(array, "the .npy array")
    logger.debug("loaded %s: topk_ids %s", path, list(topk_ids.shape))
    return TokenTrace(topk_ids=topk_ids, num_experts=num_experts, source=str(path))


def _load_npz(path: Path, num_experts: int | None) -> TokenTrace | LoadTrace:
    with np.load(path, allow_pickle=False) as archive:
        fields = {name: archive[name] for name in archive.files}

    # Step 1: the kind. An archive with topk_ids and no kind is a user's bare token trace.
    if "kind" in fields:
        kind = _scalar_str(fields, "kind")
    elif "topk_ids" in fields:
        kind = "token"
    else:
        raise ValueError(
            f"archive has no 'kind' field and no 'topk_ids' array (arrays: {sorted(fields)}); "
            "store topk_ids [num_tokens, num_layers, topk] or add kind='token'/'step_loads'/'aggregate'"
        )
    if kind not in TRACE_KINDS:
        raise ValueError(f"unknown trace kind {kind!r}; expected one of {TRACE_KINDS}")

    # Step 2: the metadata shared by all kinds.
    stored_num_experts = _scalar_int(fields, "num_experts") if "num_experts" in fields else None
    if stored_num_experts is None and num_experts is None:
        raise ValueError(f"archive does not store num_experts; {NUM_EXPERTS_HINT}")
    if stored_num_experts is not None and num_experts is not None and stored_num_experts != num_experts:
        raise ValueError(
            f"num_experts={num_experts} was passed but the file stores num_experts={stored_num_experts}; "
            "omit the argument to use the stored value"
        )
    resolved_num_experts = stored_num_experts if stored_num_experts is not None else num_experts
    source = _scalar_str(fields, "source") if "source" in fields else str(path)
    common = {
        "model": _scalar_str(fields, "model") if "model" in fields else "unknown",
        "source": source,
        "layer_ids": _optional_int_array(fields, "layer_ids").tolist() if "layer_ids" in fields else None,
        "licence": _licence(fields, source),
    }

    # Step 3: the main array of the kind.
    if kind == "token":
        if "topk_ids" not in fields:
            raise ValueError(f"kind='token' archive has no 'topk_ids' array (arrays: {sorted(fields)})")
        topk_ids = _topk_ids_from_array(fields["topk_ids"], "topk_ids")
        if "top_k" in fields and _scalar_int(fields, "top_k") != topk_ids.shape[2]:
            raise ValueError(
                f"top_k={_scalar_int(fields, 'top_k')} but topk_ids has {topk_ids.shape[2]} entries per token; "
                "fix the top_k field"
            )
        dataset_ids, dataset_names = _dataset_fields(fields, ("task_id", "dataset_id"), ("task_names", "dataset_names"))
        trace = TokenTrace(
            topk_ids=topk_ids,
            num_experts=resolved_num_experts,
            seq_ids=_optional_int_array(fields, "seq_id"),
            dataset_ids=dataset_ids,
            dataset_names=dataset_names,
            **common,
        )
    else:
        if "loads" not in fields:
            raise ValueError(f"kind={kind!r} archive has no 'loads' array (arrays: {sorted(fields)})")
        if "top_k" not in fields:
            raise ValueError(f"kind={kind!r} archive has no 'top_k' field; store the experts each token picks")
        loads = fields["loads"]
        _check_integer_array(loads, "loads")
        dataset_ids, dataset_names = _dataset_fields(fields, ("dataset_id",), ("dataset_names",))
        trace = LoadTrace(
            loads=torch.from_numpy(loads.astype(np.int64)),
            kind=kind,
            num_experts=resolved_num_experts,
            top_k=_scalar_int(fields, "top_k"),
            dataset_ids=dataset_ids,
            dataset_names=dataset_names,
            **common,
        )
    logger.debug("loaded %s: %r", path, trace)
    return trace


def _check_has_assignments(trace: TokenTrace | LoadTrace) -> None:
    """Raise ``ValueError`` for a trace without a single token-expert assignment, which no run can use."""
    if isinstance(trace, TokenTrace):
        empty = trace.num_tokens == 0 or trace.topk == 0 or trace.num_layers == 0 or not bool((trace.topk_ids >= 0).any())
        shape = list(trace.topk_ids.shape)
    else:
        empty = trace.num_steps == 0 or trace.num_layers == 0 or int(trace.loads.sum()) == 0
        shape = list(trace.loads.shape)
    if empty:
        raise ValueError(f"the trace contains no assignments (shape {shape}, no entry >= 0 or no load); record a non-empty trace")


# Field helpers.


def _topk_ids_from_array(array: np.ndarray, name: str) -> torch.Tensor:
    _check_integer_array(array, name)
    if array.ndim == 2:
        array = array[:, None, :]  # [num_tokens, 1, topk]
    if array.ndim != 3:
        raise ValueError(
            f"{name} must have shape [num_tokens, num_layers, topk] or [num_tokens, topk], got {list(array.shape)}"
        )
    return torch.from_numpy(array.astype(np.int64))


def _check_integer_array(array: np.ndarray, name: str) -> None:
    if array.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must hold integers, got dtype {array.dtype}; store expert ids or counts as an integer array "
            "(for example array.astype(np.int64) after checking the values are whole numbers)"
        )
    # Unsigned values above the int64 range would wrap to negative numbers in the int64 tensors.
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} contains {int(array.max())}, above the int64 range; store expert ids or counts that fit int64")


def _optional_int_array(fields: dict, name: str) -> torch.Tensor | None:
    if name not in fields:
        return None
    _check_integer_array(fields[name], name)
    if fields[name].ndim != 1:
        raise ValueError(f"field {name!r} must be a 1-D array with one entry per token or step, got shape {list(fields[name].shape)}")
    return torch.from_numpy(fields[name].astype(np.int64))


def _dataset_fields(fields: dict, id_names: tuple[str, ...], names_names: tuple[str, ...]):
    present = [name for name in id_names if name in fields]
    if len(present) > 1:
        raise ValueError(f"the archive stores both {' and '.join(present)}; keep one array of dataset indices")
    dataset_ids = next((_optional_int_array(fields, name) for name in id_names if name in fields), None)
    dataset_names = next((tuple(fields[name].reshape(-1).tolist()) for name in names_names if name in fields), ())
    return dataset_ids, dataset_names


def _scalar_str(fields: dict, name: str) -> str:
    value = fields[name]
    if value.ndim != 0:
        raise ValueError(f"field {name!r} must be a scalar string, got an array of shape {list(value.shape)}")
    return str(value.item())


def _scalar_int(fields: dict, name: str) -> int:
    value = fields[name]
    if value.ndim != 0 or value.dtype.kind not in "iu":
        raise ValueError(f"field {name!r} must be a scalar integer, got dtype {value.dtype} shape {list(value.shape)}")
    return int(value.item())


def _licence(fields: dict, source: str) -> str:
    if "licence" in fields:
        return _scalar_str(fields, "licence")
    for prefix, licence in _SOURCE_LICENCES.items():
        if source.startswith(prefix):
            return licence
    return UNKNOWN_LICENCE


# Validation helpers shared by the dataclasses.


def _as_int64_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}; convert with .long()")
    return value.to(device="cpu", dtype=torch.int64)


def _check_num_experts(num_experts, name: str) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{name} must be a positive int, got {num_experts!r}")


def _check_expert_ids(topk_ids: torch.Tensor, num_experts: int, name: str) -> None:
    if topk_ids.numel() == 0:
        return
    bad = (topk_ids < -1) | (topk_ids >= num_experts)
    if bool(bad.any()):
        position = torch.nonzero(bad)[0].tolist()
        value = int(topk_ids[tuple(position)])
        raise ValueError(
            f"{name}{position} = {value} is not a logical expert id: ids must be in 0..{num_experts - 1} "
            f"(num_experts={num_experts}) or -1 for an unused entry; pass the model's num_experts or fix the ids"
        )


def _check_dataset_ids(dataset_ids: torch.Tensor, dataset_names: tuple[str, ...], name: str) -> None:
    """Check that dataset indices are >= 0 and, where names are stored, index them."""
    if not dataset_ids.numel():
        return
    if dataset_names:
        _check_index_range(dataset_ids, len(dataset_names), name, "dataset_names")
    elif int(dataset_ids.min()) < 0:
        raise ValueError(f"{name} contains {int(dataset_ids.min())}; dataset indices must be >= 0")


def _check_index_range(index: torch.Tensor, size: int, name: str, names_field: str) -> None:
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= size:
        raise ValueError(
            f"{name} contains values {low}..{high} but {names_field} has {size} entries; fix the indices or the names"
        )


def _checked_layer_ids(layer_ids, num_layers: int, owner: str) -> list[int]:
    if layer_ids is None:
        return list(range(num_layers))
    for layer_id in layer_ids:
        if isinstance(layer_id, bool) or not isinstance(layer_id, numbers.Integral):
            raise ValueError(f"{owner}.layer_ids must hold ints (the model's layer indices), got {layer_id!r}")
    layer_ids = [int(layer_id) for layer_id in layer_ids]
    if len(layer_ids) != num_layers:
        raise ValueError(
            f"{owner}.layer_ids has {len(layer_ids)} entries but the trace has {num_layers} layers; "
            "give one model layer index per entry of the layer axis"
        )
    return layer_ids
