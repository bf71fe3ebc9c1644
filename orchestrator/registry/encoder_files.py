"""The two files selfsup loads a registered encoder from, and the strict reading of each.

- `encoder.json`: how to build the encoder with selfsup's own code: `{"format", "name",
  "cifar_stem", "kwargs"}`, the arguments of `methods.encoders.build_encoder` (JSON values only).
- `encoder.safetensors`: its `state_dict`, in the safetensors format: a length-prefixed JSON header
  and raw tensor bytes, read by a parser that evaluates nothing (no pickle, no code objects).

Why not the model's torch.export ("pt2") archive, which selfsup also logs for deployment: loading a
pt2 hands the graph's size expressions (`expr_str`, plain JSON in the archive) to sympy, which
evaluates them as Python, and the deserialiser calls any registered aten op the graph names
(`aten.from_file` reads a file). A model version is written by any job holding the cluster's MLflow
login, so its bytes are not trusted: selfsup never deserialises the pt2 (docs/design.md, "Loading a
registered encoder").
"""

from __future__ import annotations

import json
import math
from typing import Any

from orchestrator.errors import UserError

SPEC_FILE = "encoder.json"
WEIGHTS_FILE = "encoder.safetensors"
# Where `mlflow.pytorch.log_model(extra_files=...)` puts them inside the logged model.
FILES_DIR = "extra_files"
SPEC_FORMAT = "selfsup-encoder/1"

# Read before anything else, so a huge or endless file is refused before it is downloaded or parsed.
MAX_SPEC_BYTES = 64 * 1024
# ViT-B/16 is ~350 MB in float32 and ResNet-50 ~100 MB; a ViT-g would need this raised.
MAX_WEIGHTS_BYTES = 2 * 1024**3

_ALLOWED_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})


def encoder_spec(encoder: Any) -> dict[str, Any]:
    """The `encoder.json` contents of an encoder made by `methods.encoders.build_encoder`.

    Raises:
        ValueError: the encoder was not made by `build_encoder` (it has no `build_spec`), so it
            could not be rebuilt from selfsup's own code when loaded.
    """
    build = getattr(encoder, "build_spec", None)
    if not isinstance(build, dict):
        raise ValueError(f"{type(encoder).__name__} was not built by methods.encoders.build_encoder; only such "
                         "encoders can be registered (they are rebuilt from their name and arguments when loaded)")
    return {"format": SPEC_FORMAT, **build}


def check_spec(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and check `encoder.json`: the build arguments, or a one-line `UserError`.

    The name must be one of selfsup's encoders (or `timm:<model>`), the arguments JSON values with
    no argument that reads a file or downloads weights.
    """
    from methods.encoders import ENCODERS, WEIGHT_ARGS

    if len(raw) > MAX_SPEC_BYTES:
        raise refuse(where, f"{SPEC_FILE} is {len(raw)} bytes (at most {MAX_SPEC_BYTES})")
    try:
        spec = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise refuse(where, f"{SPEC_FILE} is not JSON ({type(e).__name__})") from None
    if not isinstance(spec, dict) or set(spec) != {"format", "name", "cifar_stem", "kwargs"}:
        raise refuse(where, f"{SPEC_FILE} must have exactly the keys format, name, cifar_stem, kwargs")
    if spec["format"] != SPEC_FORMAT:
        raise refuse(where, f"{SPEC_FILE} format {spec['format']!r} (this selfsup reads {SPEC_FORMAT!r})")
    name, kwargs = spec["name"], spec["kwargs"]
    if not isinstance(name, str) or not (name in ENCODERS or (name.startswith("timm:") and len(name) > 5)):
        raise refuse(where, f"unknown encoder {name!r} in {SPEC_FILE}; allowed: {', '.join(ENCODERS)}, timm:<model>")
    if not isinstance(spec["cifar_stem"], bool):
        raise refuse(where, f"{SPEC_FILE} cifar_stem must be true or false")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise refuse(where, f"{SPEC_FILE} kwargs must be an object")
    bad = sorted(set(kwargs) & set(WEIGHT_ARGS))
    if bad:
        raise refuse(where, f"{SPEC_FILE} argument {bad[0]!r} would read a file or fetch weights")
    for key, value in kwargs.items():
        if not _plain(value):
            raise refuse(where, f"{SPEC_FILE} argument {key!r} is not a plain JSON value")
    return spec


def _no_constant(token: str) -> None:
    raise ValueError(f"{token} is not JSON")


def _plain(value: Any, depth: int = 0) -> bool:
    """A JSON scalar, or a short list of them (e.g. a ResNet's widths): nothing that names code."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return not isinstance(value, str) or len(value) <= 200
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list) and depth == 0:
        return len(value) <= 64 and all(_plain(v, 1) for v in value)
    return False


def check_weights_header(raw: bytes, where: str) -> dict[str, tuple[str, list[int]]]:
    """The tensors a safetensors file declares (name -> (dtype, shape)), checked against its size.

    The header is read here (8-byte length, then JSON) rather than trusting the library with an
    unchecked file, so that a header that claims more bytes than the file holds, overlapping
    tensors or an unexpected dtype are refused with one line before any tensor is made.
    """
    if len(raw) < 8:
        raise refuse(where, f"{WEIGHTS_FILE} is too short")
    size = int.from_bytes(raw[:8], "little")
    if size > min(len(raw) - 8, 100 * 1024**2):
        raise refuse(where, f"{WEIGHTS_FILE} header claims {size} bytes")
    try:
        header = json.loads(raw[8:8 + size].decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        raise refuse(where, f"{WEIGHTS_FILE} header is not JSON") from None
    if not isinstance(header, dict):
        raise refuse(where, f"{WEIGHTS_FILE} header is not a JSON object")
    header.pop("__metadata__", None)
    tensors: dict[str, tuple[str, list[int]]] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise refuse(where, f"{WEIGHTS_FILE} entry {name!r} is malformed") from None
        if dtype not in _ALLOWED_DTYPES:
            raise refuse(where, f"{WEIGHTS_FILE} tensor {name!r} has dtype {dtype!r}")
        if not 0 <= start <= end <= len(raw) - 8 - size or any(s < 0 for s in shape):
            raise refuse(where, f"{WEIGHTS_FILE} tensor {name!r} lies outside the file")
        tensors[name] = (dtype, shape)
        spans.append((start, end))
    spans.sort()
    if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])):
        raise refuse(where, f"{WEIGHTS_FILE} has overlapping tensors")
    return tensors


def build_and_load(spec: dict[str, Any], weights: bytes, where: str) -> Any:
    """The encoder `spec` describes, with the weights of `weights`; eval mode, on the CPU.

    The module is first built on the `meta` device (no memory) and its state's names and shapes
    compared with the file's header, so a spec that asks for a huge model, or weights that do not
    fit it, are refused before anything is allocated.
    """
    import torch
    from safetensors.torch import load as load_safetensors

    from methods.encoders import build_encoder

    declared = check_weights_header(weights, where)

    def build() -> Any:
        try:
            return build_encoder(spec["name"], cifar_stem=spec["cifar_stem"], **spec["kwargs"])
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise refuse(where, f"{SPEC_FILE} does not build an encoder: {str(e).splitlines()[0][:200]}") from None

    try:
        with torch.device("meta"):
            skeleton = build()
    except UserError:
        raise
    except Exception:  # noqa: BLE001
        # Some constructors (timm's drop-path rates) call `.item()`, which the meta device cannot
        # answer; those are built for real, and checked the same way before their weights load.
        skeleton = build()
    expected = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    got = {k: shape for k, (_, shape) in declared.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        detail = (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}" if extra
                  else f"{wrong[0]!r} has shape {got[wrong[0]]}, the encoder's is {expected[wrong[0]]}")
        raise refuse(where, f"{WEIGHTS_FILE} does not match the encoder {spec['name']!r} ({detail})")
    try:
        state = load_safetensors(weights)
    except Exception as e:  # the parser's own refusal of a malformed file  # noqa: BLE001
        raise refuse(where, f"{WEIGHTS_FILE} is malformed ({type(e).__name__})") from None
    encoder = build()
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def weights_bytes(encoder: Any) -> bytes:
    """The encoder's `state_dict` as safetensors bytes (on the CPU, contiguous)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()})


def refuse(where: str, why: str) -> UserError:
    return UserError(f"{where}: refused to load: {why}; selfsup builds a registered encoder from its own code "
                     f"and reads only its {SPEC_FILE} and {WEIGHTS_FILE}")
