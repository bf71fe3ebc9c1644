"""A registered model's bytes never run code or read a file outside the model (issue: trust, item 1).

Any job holding the cluster's MLflow login can write a model version, so each test tampers with a
version that selfsup registered, the way such a job could, then loads it as `registry embed` and
`evaluate` do. The two pt2 attacks are first shown to be real: torch.export.load runs them.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator import registry, tracking
from orchestrator.cli import main as cli_main
from orchestrator.errors import UserError
from orchestrator.registry.encoder_files import MAX_SPEC_BYTES

pytestmark = pytest.mark.slow  # MLflow registrations, a few seconds each


def _register(tmp_path: Path, name: str = "victim") -> tuple[str, torch.nn.Module, Path]:
    """A convnet registered through the real path; (store URI, the encoder, its model folder)."""
    from methods.encoders import build_encoder

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "safety", artifact_location=str(tmp_path / "artifacts"))
    run_id = tracking.start_run(uri, exp, "r", {}, "{}\n")
    torch.manual_seed(0)
    encoder = build_encoder("convnet").eval()
    v = tracking.register_encoder(encoder, tracking_uri=uri, run_id=run_id, model_name=name, image_size=32,
                                  tags={"method": "simclr"})
    folder = Path(registry.connect(uri).get_model_version_download_uri(name, str(v.version)))
    assert (folder / "data" / "model.pt2").is_file() and (folder / "extra_files" / "encoder.json").is_file()
    return uri, encoder, folder


def _rewrite_zip(path: Path, edit: Any) -> None:
    """Rewrite every `models/*.json` record of a pt2 archive with `edit(json) -> json`."""
    zin = zipfile.ZipFile(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if "/models/" in info.filename and info.filename.endswith(".json"):
                data = json.dumps(edit(json.loads(data))).encode()
            zout.writestr(info, data)
    zin.close()
    path.write_bytes(buf.getvalue())


def _torch_export_load_runs(pt2: Path, tmp_path: Path, call: bool = False) -> str:
    """What torch.export.load (and, with `call`, one forward) of `pt2` prints, in a fresh process."""
    code = ("import sys, torch\nm = torch.export.load(sys.argv[1]).module()\n"
            + ("out = m(torch.zeros(2, 3, 32, 32))\nprint(bytes(out[0, :16].round().to(torch.uint8).tolist()))\n"
               if call else "print('loaded')\n"))
    done = subprocess.run([sys.executable, "-c", code, str(pt2)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    return done.stdout + done.stderr


def _embeddings(uri: str, name: str) -> torch.Tensor:
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        return registry.load_encoder(f"{name}/1", tracking_uri=uri)(x)


def test_a_size_expression_that_runs_code_is_never_evaluated(tmp_path: Path) -> None:
    uri, encoder, folder = _register(tmp_path)
    marker = tmp_path / "pwned"
    exploit = f"__import__('os').system('touch {marker}') or Symbol('s77', integer=True, positive=True)"

    def plant(record: Any) -> Any:
        text = json.dumps(record)
        first = text.index('"expr_str": "') + len('"expr_str": "')
        end = text.index('"', first)
        return json.loads(text[:first] + exploit.replace("'", "\\u0027") + text[end:])

    pt2 = folder / "data" / "model.pt2"
    _rewrite_zip(pt2, plant)
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(_embeddings(uri, "victim"), encoder(x), atol=1e-6)
    assert not marker.exists()
    # The attack is real: torch.export.load evaluates the expression.
    _torch_export_load_runs(pt2, tmp_path)
    assert marker.exists()


def test_a_graph_that_reads_a_file_is_never_run(tmp_path: Path) -> None:
    from torch._export.serde.schema import ScalarType

    uri, encoder, folder = _register(tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRET-BYTES-16!")

    class Planted(torch.nn.Module):  # a stand-in graph with one node to swap for a file read
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3)).repeat(1, 6)[:, :16] * 0 + torch.ops.aten.scalar_tensor.default(0.0)

    pt2 = folder / "data" / "model.pt2"
    torch.export.save(torch.export.export(Planted(), (torch.zeros(2, 3, 32, 32),)), str(pt2))

    def read_secret(record: Any) -> Any:
        for node in record["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.scalar_tensor.default":
                node["target"] = "torch.ops.aten.from_file.default"
                node["inputs"] = [{"name": "filename", "arg": {"as_string": str(secret)}, "kind": 1},
                                  {"name": "shared", "arg": {"as_bool": False}, "kind": 1},
                                  {"name": "size", "arg": {"as_int": 16}, "kind": 1},
                                  {"name": "dtype", "arg": {"as_scalar_type": ScalarType.BYTE.value}, "kind": 2}]
        return record

    _rewrite_zip(pt2, read_secret)
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        got = _embeddings(uri, "victim")
        assert torch.allclose(got, encoder(x), atol=1e-6)
    # The attack is real: the deserialised graph reads the file into its output.
    assert "SECRET-BYTES-16!" in _torch_export_load_runs(pt2, tmp_path, call=True)


def _edit_spec(folder: Path, **changes: Any) -> None:
    path = folder / "extra_files" / "encoder.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, why", [
    ({"name": "os.system"}, "unknown encoder 'os.system'"),
    ({"name": "timm:resnet18", "kwargs": {"checkpoint_path": "/etc/passwd"}}, "'checkpoint_path' would read a file"),
    ({"name": "timm:resnet18", "kwargs": {"pretrained": True}}, "'pretrained' would read a file or fetch weights"),
    ({"kwargs": {"widths": {"__class__": "x"}}}, "argument 'widths' is not a plain JSON value"),
    ({"name": "resnet50"}, "encoder.safetensors does not match the encoder 'resnet50'"),
    ({"format": "pickle"}, "format 'pickle'"),
    ({"extra": 1}, "must have exactly the keys"),
])
def test_a_tampered_spec_is_refused_in_one_line(tmp_path: Path, changes: dict[str, Any], why: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    uri, _, folder = _register(tmp_path)
    _edit_spec(folder, **changes)
    images = tmp_path / "images"
    images.mkdir()
    from torchvision.io import encode_jpeg
    (images / "a.jpg").write_bytes(encode_jpeg(torch.zeros(3, 32, 32, dtype=torch.uint8)).numpy().tobytes())
    out = tmp_path / "emb.parquet"
    assert cli_main(["registry", "embed", "victim/1", str(images), str(out), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models:/victim/1: refused to load: " in err and why in err, err
    assert not out.exists()


def test_tampered_weights_and_oversized_files_are_refused(tmp_path: Path) -> None:
    uri, _, folder = _register(tmp_path)
    weights = folder / "extra_files" / "encoder.safetensors"
    good = weights.read_bytes()
    # A header that claims more bytes than the file holds.
    weights.write_bytes((10**9).to_bytes(8, "little") + good[8:])
    with pytest.raises(UserError, match="encoder.safetensors header claims 1000000000 bytes"):
        registry.load_encoder("victim/1", tracking_uri=uri)
    # A tensor whose offsets lie past the end.
    size = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + size])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10**7
    raw = json.dumps(header).encode()
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + good[8 + size:])
    with pytest.raises(UserError, match=f"tensor '{first}' lies outside the file"):
        registry.load_encoder("victim/1", tracking_uri=uri)
    weights.write_bytes(good)
    # A spec over the size limit is refused by the store's listing, before it is read.
    spec = folder / "extra_files" / "encoder.json"
    spec.write_text(" " * (MAX_SPEC_BYTES + 1) + spec.read_text())
    with pytest.raises(UserError, match=f"encoder.json is {MAX_SPEC_BYTES + 1 + len(spec.read_text().strip())}"):
        registry.load_encoder("victim/1", tracking_uri=uri)


def test_a_version_without_the_two_files_is_refused(tmp_path: Path) -> None:
    uri, _, folder = _register(tmp_path)
    (folder / "extra_files" / "encoder.safetensors").unlink()
    with pytest.raises(UserError, match="it has no encoder.safetensors .*register it again"):
        registry.load_encoder("victim/1", tracking_uri=uri)


def test_only_encoders_selfsup_can_rebuild_are_registered(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "safety", artifact_location=str(tmp_path / "artifacts"))
    run_id = tracking.start_run(uri, exp, "r", {}, "{}\n")
    stranger = torch.nn.Conv2d(3, 4, 3)
    stranger.output_dim = 4
    with pytest.raises(ValueError, match="Conv2d was not built by methods.encoders.build_encoder"):
        tracking.register_encoder(stranger, tracking_uri=uri, run_id=run_id, model_name="x", image_size=32, tags={})
