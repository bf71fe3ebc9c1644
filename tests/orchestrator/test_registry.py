"""`selfsup registry` against a real `mlflow server` and a local SQLite store.

Encoders are small real torch models registered the way pretraining registers them (tags
`method`, `dataset`, `knn_top1`; pt2 with a dynamic batch dimension), so every subcommand runs
the real MLflow paths, including loading the model back for `embed`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import registry
from orchestrator.cli import main as cli_main
from orchestrator.errors import UserError

pytestmark = pytest.mark.slow


@dataclass
class Store:
    uri: str
    dataset: str          # unique per store, so a shared server's other models never interfere
    model: str            # f"{dataset}-encoder"
    versions: dict[str, tuple[str, float]]  # version -> (method, knn_top1)


def tiny_encoder(seed: int) -> torch.nn.Module:
    """A small real conv encoder ([B, 3, H, W] -> [B, 16], H, W >= 8); untrained, distinct per seed.
    Built by `build_encoder`, as selfsup registers only encoders it can rebuild."""
    from methods.encoders import build_encoder

    torch.manual_seed(seed)
    return build_encoder("convnet", widths=[4, 8, 16])


def _register(uri: str, model: str, dataset: str, method: str, knn_top1: float, *, image_size: int = 32,
              **protocol: object) -> str:
    """Register an encoder through the real pretraining path; returns the version. `protocol`: more
    version tags (the kNN protocol of `pretrain.protocol_tags`)."""
    from orchestrator import tracking

    exp = tracking.ensure_experiment(uri, f"registry-test-{dataset}")
    run_id = tracking.start_run(uri, exp, f"{method}-{knn_top1}", {"method.name": method}, "{}\n")
    encoder = tiny_encoder(seed=len(method) + int(knn_top1 * 100))
    v = tracking.register_encoder(encoder, tracking_uri=uri, run_id=run_id, model_name=model,
                                  image_size=image_size, tags={"method": method, "dataset": dataset,
                                                               "knn_top1": f"{knn_top1:.4f}", **protocol})
    tracking.finish_run(uri, run_id)
    return str(v.version)


def _make_store(uri: str) -> Store:
    dataset = f"ds{uuid.uuid4().hex[:6]}"
    model = f"{dataset}-encoder"
    versions = {}
    for method, acc in (("simclr", 0.41), ("byol", 0.57), ("moco", 0.33)):
        versions[_register(uri, model, dataset, method, acc)] = (method, acc)
    return Store(uri, dataset, model, versions)


@pytest.fixture(scope="module", params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("mlflow_server")
    yield _make_store(uri)


def _cli(*argv: str) -> int:
    return cli_main(list(argv))


def test_list_shows_versions_tags_and_aliases(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    client = registry.connect(store.uri)
    registry.promote(client, store.model, "2", "champion")
    assert _cli("registry", "--tracking-uri", store.uri, "list") == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines() if store.model in ln]
    assert len(lines) == 3
    by_version = {ln[1]: ln for ln in lines}
    assert by_version["2"][2] == "champion" and "0.5700" in by_version["2"] and "byol" in by_version["2"]
    assert "simclr" in by_version["1"] and "0.4100" in by_version["1"] and store.dataset in by_version["1"]


def test_show_by_alias_version_and_name(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    client = registry.connect(store.uri)
    registry.promote(client, store.model, "2", "champion")
    assert _cli("registry", "--tracking-uri", store.uri, "show", f"{store.model}@champion") == 0
    out = capsys.readouterr().out
    assert f"models:/{store.model}/2" in out and "tag.method       byol" in out
    assert _cli("registry", "--tracking-uri", store.uri, "show", f"models:/{store.model}/3") == 0
    assert "tag.method       moco" in capsys.readouterr().out
    # a bare name means its champion
    assert str(registry.resolve_version(client, store.model).version) == "2"


@pytest.mark.parametrize("ref, message", [
    ("nosuchmodel", "no registered model 'nosuchmodel'; registered: "),
    ("{model}@nosuchalias", "has no alias 'nosuchalias'; aliases: "),
    ("{model}/99", "has no version 99; versions: 1, 2, 3"),
    ("a/b/c", "bad model reference 'a/b/c'"),
])
def test_show_unknown_reference_is_one_line_exit_2(store: Store, ref: str, message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("registry", "--tracking-uri", store.uri, "show", ref.format(model=store.model)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    if ref == "nosuchmodel":
        assert store.model in err  # the message lists what is registered


def test_best_filters_by_dataset_and_method(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("registry", "--tracking-uri", store.uri, "best", "--metric", "knn_top1",
                "--dataset", store.dataset) == 0
    assert capsys.readouterr().out.strip() == f"models:/{store.model}/2\tknn_top1=0.5700"
    assert _cli("registry", "--tracking-uri", store.uri, "best", "--dataset", store.dataset,
                "--method", "simclr") == 0
    assert capsys.readouterr().out.startswith(f"models:/{store.model}/1\t")
    assert _cli("registry", "--tracking-uri", store.uri, "best", "--dataset", "nosuchdataset") == 2
    assert "no registered encoder matches dataset=nosuchdataset" in capsys.readouterr().err
    assert _cli("registry", "--tracking-uri", store.uri, "best", "--dataset", store.dataset,
                "--metric", "nosuchmetric") == 2
    assert "has a metric 'nosuchmetric'" in capsys.readouterr().err
    assert _cli("registry", "--tracking-uri", store.uri, "best", "--model", "nosuchmodel") == 2
    assert "no registered model 'nosuchmodel'" in capsys.readouterr().err


def test_promote_moves_alias_and_rejects_unknowns(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    client = registry.connect(store.uri)
    assert _cli("registry", "--tracking-uri", store.uri, "promote", store.model, "3", "--alias", "staging") == 0
    assert str(client.get_model_version_by_alias(store.model, "staging").version) == "3"
    assert _cli("registry", "--tracking-uri", store.uri, "promote", store.model, "1", "--alias", "staging") == 0
    assert str(client.get_model_version_by_alias(store.model, "staging").version) == "1"
    capsys.readouterr()
    assert _cli("registry", "--tracking-uri", store.uri, "promote", store.model, "42", "--alias", "x") == 2
    assert "has no version 42" in capsys.readouterr().err
    assert _cli("registry", "--tracking-uri", store.uri, "promote", "nosuchmodel", "1") == 2
    assert "no registered model 'nosuchmodel'" in capsys.readouterr().err


def test_promote_if_better_only_moves_champion_up(store: Store) -> None:
    client = registry.connect(store.uri)
    model = f"{store.model}-champ"
    v_low = _register(store.uri, model, store.dataset, "simclr", 0.30)
    assert registry.promote_if_better(client, model, v_low)          # no champion yet
    v_high = _register(store.uri, model, store.dataset, "moco", 0.50)
    assert registry.promote_if_better(client, model, v_high)         # better: moves
    v_mid = _register(store.uri, model, store.dataset, "byol", 0.40)
    assert not registry.promote_if_better(client, model, v_mid)      # worse: stays
    assert not registry.promote_if_better(client, model, v_high)     # already champion
    assert str(client.get_model_version_by_alias(model, "champion").version) == v_high


def test_embed_image_folder(store: Store, tmp_path: Path, cifar10_dir: Path) -> None:
    folder = tmp_path / "images"
    rows = pq.read_table(cifar10_dir / "test-00000-of-00001.parquet").slice(0, 10).to_pylist()
    for i, row in enumerate(rows):
        cls = folder / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{i}.jpg").write_bytes(row["image"])
    out = tmp_path / "emb.parquet"
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"models:/{store.model}/1",
                str(folder), str(out)) == 0
    table = pq.read_table(out)
    assert table.num_rows == 10 and set(table.column("label").to_pylist()) == {0, 1}
    emb = table.column("embedding").to_pylist()
    assert len(emb[0]) == 16 and len({tuple(e) for e in emb}) == 10  # real, distinct features

    # The same images as a shard folder (both splits): the same embeddings.
    from pipelines.ingest import ingest

    ingest(str(folder), str(tmp_path / "shards"), progress=False)
    out2 = tmp_path / "emb2.parquet"
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"models:/{store.model}/1",
                str(tmp_path / "shards"), str(out2)) == 0
    table2 = pq.read_table(out2)
    assert table2.num_rows == 10
    assert {p.split(":", 1)[0] for p in table2.column("path").to_pylist()} == {"train", "test"}
    import numpy as np

    np.testing.assert_allclose(np.array(sorted(map(tuple, table2.column("embedding").to_pylist()))),
                               np.array(sorted(map(tuple, emb))), atol=1e-5)


def test_embed_errors(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchvision.io import encode_jpeg

    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.jpg").write_bytes(
        encode_jpeg(torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)).numpy().tobytes())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"{store.model}@nosuchalias",
                str(tmp_path / "one"), str(tmp_path / "o.parquet")) == 2
    assert "has no alias 'nosuchalias'" in capsys.readouterr().err
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"{store.model}/1",
                str(tmp_path / "empty"), str(tmp_path / "o.parquet")) == 2
    assert "no shard folder (manifest.json) and no" in capsys.readouterr().err
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"{store.model}/1",
                str(tmp_path / "bad"), str(tmp_path / "o.parquet")) == 2
    assert "x.jpg: cannot decode image" in capsys.readouterr().err
    # A decompression bomb (a 0.1 MB PNG of 9500 x 9500 pixels) is refused from its header.
    from tests.image_files import bomb_png

    (tmp_path / "bomb").mkdir()
    (tmp_path / "bomb" / "x.png").write_bytes(bomb_png(9500, 9500))
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"{store.model}/1",
                str(tmp_path / "bomb"), str(tmp_path / "o.parquet")) == 2
    assert "x.png: 9500x9500 = 90,250,000 pixels, more than --max-image-pixels" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_embed_any_image_size_and_one_line_input_errors(store: Store, tmp_path: Path, cifar10_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, row in enumerate(pq.read_table(cifar10_dir / "test-00000-of-00001.parquet").slice(0, 4).to_pylist()):
        (folder / f"{i}.jpg").write_bytes(row["image"])
    uri = f"models:/{store.model}/1"
    v = registry.connect(store.uri).get_model_version(store.model, "1")
    assert v.tags["input_min_size"] == "8" and v.tags["input_channels"] == "3"
    assert "any height and width >= 8 (trained at 32x32)" in v.description
    out = tmp_path / "emb.parquet"
    assert _cli("registry", "--tracking-uri", store.uri, "embed", uri, str(folder), str(out),
                "--image-size", "40x36") == 0
    assert pq.read_table(out).num_rows == 4
    capsys.readouterr()
    assert _cli("registry", "--tracking-uri", store.uri, "embed", uri, str(folder), str(tmp_path / "small.parquet"),
                "--image-size", "7") == 2
    err = capsys.readouterr().err
    assert err == f"selfsup registry: error: {uri} takes images of at least 8x8 pixels; got 7x7\n"
    assert not (tmp_path / "small.parquet").exists()

    encoder = registry.load_encoder(uri, tracking_uri=store.uri)  # the Python API checks the same way
    assert encoder(torch.randn(2, 3, 8, 11)).shape == (2, 16)
    with pytest.raises(UserError, match=r"takes 3-channel \(RGB\) images; got 1 channel "):
        encoder(torch.randn(2, 1, 32, 32))


def test_missing_store_and_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _cli("registry", "--tracking-uri", f"sqlite:///{tmp_path / 'nope.db'}", "list") == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists()
    assert _cli("registry", "--tracking-uri", f"http://127.0.0.1:{port}", "list") == 2
    assert "cannot reach the MLflow server" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        registry.connect(f"sqlite:///{tmp_path / 'nope.db'}")
    proc = subprocess.run([str(Path(sys.executable).parent / "selfsup"), "registry", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'nope.db'}", "list"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("selfsup registry: error: no MLflow store")


# --- trust boundaries: what selfsup loads, names, champions, errors -----------------------------------

class PicklePayload(torch.nn.Module):
    """Unpickling this opens (creates) `marker`: a stand-in for whatever code a pickled model runs."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _experiment(uri: str, what: str) -> str:
    from orchestrator import tracking

    return tracking.ensure_experiment(uri, f"registry-test-{what}")


def _quiet_stderr() -> contextlib.AbstractContextManager:
    """MLflow eprint()s its registration notices on stderr, which these tests read."""
    return contextlib.redirect_stderr(sys.stdout)


def _one_image_folder(tmp_path: Path) -> Path:
    from torchvision.io import encode_jpeg

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(
        encode_jpeg(torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)).numpy().tobytes())
    return folder


def test_a_pickled_model_is_refused_and_its_code_never_runs(mlflow_server: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)  # MLflow 3.17's default: allowed
    marker = tmp_path / "payload-ran"
    model = f"pickled-{uuid.uuid4().hex[:6]}"
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    # Not mlflow.set_experiment: it stays set for the process, and register_encoder's runs elsewhere.
    with mlflow.start_run(experiment_id=_experiment(mlflow_server, "pickle")), _quiet_stderr():
        mlflow.pytorch.log_model(PicklePayload(str(marker)), name="encoder", serialization_format="pickle",
                                 pip_requirements=["torch"], registered_model_name=model)
    assert not marker.exists()

    out = tmp_path / "emb.parquet"
    assert _cli("registry", "embed", f"{model}/1", str(_one_image_folder(tmp_path)), str(out),
                "--tracking-uri", mlflow_server) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"selfsup registry: error: models:/{model}/1: refused to load: it has no encoder.json")
    assert not marker.exists() and not out.exists()

    # The payload is real: MLflow's own loader, with its default (pickle allowed), runs it.
    with contextlib.suppress(Exception):
        mlflow.pytorch.load_model(f"models:/{model}/1")
    assert marker.exists()


def test_a_pt2_model_with_a_code_path_is_refused(mlflow_server: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    code = tmp_path / "helper.py"
    code.write_text("raise SystemExit('code from the model store ran')\n")
    model = f"withcode-{uuid.uuid4().hex[:6]}"
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    with mlflow.start_run(experiment_id=_experiment(mlflow_server, "code")), torch.no_grad(), _quiet_stderr():
        mlflow.pytorch.log_model(tiny_encoder(seed=0), name="encoder", serialization_format="pt2",
                                 input_example=torch.randn(2, 3, 32, 32).numpy(), code_paths=[str(code)],
                                 pip_requirements=["torch"], registered_model_name=model)
    with pytest.raises(UserError, match=r"refused to load: it has no encoder.json"):
        registry.load_encoder(f"{model}/1", tracking_uri=mlflow_server)


def test_load_encoder_loads_what_selfsup_registers(store: Store) -> None:
    encoder = registry.load_encoder(f"{store.model}/2", tracking_uri=store.uri)
    assert (encoder.image_size, encoder.output_dim, encoder.uri) == ((32, 32), 16, f"models:/{store.model}/2")
    with torch.no_grad():
        assert encoder.module(torch.randn(5, 3, 32, 32)).shape == (5, 16)


def test_a_model_name_with_quotes_lists_and_shows(mlflow_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Names selfsup would refuse at config time can still be in a store (made by hand): `registry
    list` and `show` work with them (MLflow's search filters unescape nothing)."""
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    run = c.create_run(_experiment(mlflow_server, "names"))
    tag = uuid.uuid4().hex[:6]
    names = [f"it's-{tag}", f'say "{tag}"', f"""both'"{tag}"""]
    for name in names:  # versions without files: listing and showing read only the registry
        c.create_registered_model(name)
        c.create_model_version(name, source=f"{run.info.artifact_uri}/encoder", run_id=run.info.run_id,
                               tags={"method": "simclr"})
    assert _cli("registry", "list", "--tracking-uri", mlflow_server) == 0
    out = capsys.readouterr().out
    for name in names:
        assert name in out
    for name in names:
        assert _cli("registry", "show", f"{name}/1", "--tracking-uri", mlflow_server) == 0
        assert f"models:/{name}/1" in capsys.readouterr().out


def test_the_champion_moves_only_between_versions_measured_alike(mlflow_server: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.pretrain import PretrainResult
    from orchestrator.run_output import print_summary

    client = registry.connect(mlflow_server)
    model = f"protocol-{uuid.uuid4().hex[:6]}"
    demo = {"knn_k": 200, "knn_t": 0.1, "knn_bank": 4000, "knn_queries": 1000}
    v1 = _register(mlflow_server, model, "mnist-demo", "simclr", 0.60, **demo)
    assert registry.promote_if_better(client, model, v1)
    # A sweep's smaller kNN bank, fewer queries and smaller images: a higher number, not comparable.
    v2 = _register(mlflow_server, model, "mnist-demo", "byol", 0.90, image_size=28,
                   **{**demo, "knn_bank": 1000, "knn_queries": 500})
    p = registry.promote_if_better(client, model, v2)
    assert not p and p.holder == v1
    assert "'champion' stays at version 1: measured differently" in p.reason
    assert "image_size 32 (v1) vs 28 (v2)" in p.reason and "knn_bank 4000 (v1) vs 1000 (v2)" in p.reason
    assert "knn_queries 1000 (v1) vs 500 (v2)" in p.reason
    assert str(client.get_model_version_by_alias(model, "champion").version) == v1
    # The command says why.
    print_summary(PretrainResult(run_name="r", run_dir="d", tracking_uri=mlflow_server, experiment="e",
                                  mlflow_run_id="x", epochs=1, knn_top1=0.9, model_name=model, model_version=v2,
                                  champion=p.moved, champion_note=p.reason))
    assert f"champion:     {p.reason}" in capsys.readouterr().out
    # Measured alike and better: it moves.
    v3 = _register(mlflow_server, model, "mnist-demo", "moco", 0.70, **demo)
    assert registry.promote_if_better(client, model, v3)
    assert str(client.get_model_version_by_alias(model, "champion").version) == v3


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(store: Store, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # An OS error: the output's folder is a file.
    (tmp_path / "afile").write_text("")
    folder = _one_image_folder(tmp_path)
    assert _cli("registry", "embed", f"{store.model}/1", str(folder), str(tmp_path / "afile" / "o.parquet"),
                "--tracking-uri", store.uri) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("selfsup registry: error: FileExistsError: "), err
    assert str(tmp_path / "afile") in err
    # An MLflow error: an alias name MLflow refuses.
    assert _cli("registry", "--tracking-uri", store.uri, "promote", store.model, "1", "--alias", "no way!") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("selfsup registry: error: MlflowException: "), err
    # SELFSUP_DEBUG=1: the traceback instead, same exit code.
    monkeypatch.setenv("SELFSUP_DEBUG", "1")
    assert _cli("registry", "--tracking-uri", store.uri, "promote", store.model, "1", "--alias", "no way!") == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "MlflowException" in err


def test_tracking_uri_goes_before_or_after_the_registry_command(store: Store,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("registry", "list", "--tracking-uri", store.uri) == 0
    after = capsys.readouterr().out
    assert _cli("registry", "--tracking-uri", store.uri, "list") == 0
    assert capsys.readouterr().out == after and store.model in after
    assert _cli("registry", "best", "--tracking-uri", store.uri, "--dataset", store.dataset) == 0
    assert capsys.readouterr().out.startswith(f"models:/{store.model}/2\t")


def test_a_vit_encoder_registers_loads_and_embeds_at_two_sizes(tmp_path: Path) -> None:
    """A ViT-Tiny/4 (CPU-sized) through the registration and loading path; it embeds at its training
    size and at another multiple of its patch as the encoder itself does."""
    from methods.encoders import build_encoder
    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "vit", artifact_location=str(tmp_path / "mlruns"))
    run_id = tracking.start_run(uri, exp, "vit", {"method.name": "dino"}, "{}\n")
    torch.manual_seed(0)
    vit = build_encoder("vit_tiny", patch_size=4, depth=1, embed_dim=32, num_heads=2).eval()
    tracking.register_encoder(vit, tracking_uri=uri, run_id=run_id, model_name="vit-encoder", image_size=32,
                              tags={"method": "dino", "dataset": "x"})
    tracking.finish_run(uri, run_id)
    loaded = registry.load_encoder("vit-encoder/1", tracking_uri=uri)
    assert loaded.output_dim == 32
    with torch.no_grad():
        for size in ((32, 32), (48, 40)):
            x = torch.randn(3, 3, *size)
            torch.testing.assert_close(loaded.module(x), vit(x), rtol=1e-5, atol=1e-5)




def test_mixed_size_photos_embed_and_evaluate_from_and_to_uris(tmp_path: Path, s3_bucket: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Photos of mixed sizes: ingest -> embed on local paths, and the same dataset in S3 -> embed
    with an s3:// output and evaluate on the s3:// dataset (issue 23: a URI never becomes a path)."""
    import numpy as np

    from pipelines import storage
    from pipelines.ingest import ingest
    from tests.image_files import photo_jpeg

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = f"photos{uuid.uuid4().hex[:6]}-encoder"
    _register(uri, model, "photos", "simclr", 0.5)
    photos = tmp_path / "photos"
    for i in range(12):
        f = photos / ("a" if i % 2 else "b") / f"{i}.jpg"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(photo_jpeg(i, min_side=64, max_side=160))
    ingest(str(photos), tmp_path / "ds", test_fraction=0.25, progress=False)
    assert _cli("registry", "--tracking-uri", uri, "embed", f"{model}/1", str(tmp_path / "ds"),
                str(tmp_path / "emb.parquet")) == 0
    local = pq.read_table(tmp_path / "emb.parquet")
    assert local.num_rows == 12

    ds = storage.join(s3_bucket, "photos-ds")
    ingest(str(photos), ds, test_fraction=0.25, progress=False)
    out = storage.join(s3_bucket, "emb", "photos.parquet")
    assert _cli("registry", "--tracking-uri", uri, "embed", f"{model}/1", ds, out) == 0
    assert not Path("s3:").exists(), "an s3:// output never becomes a local folder"
    remote = pq.read_table(storage.open_input_file(out))
    assert remote.column("path").to_pylist() == local.column("path").to_pylist()
    np.testing.assert_allclose(np.array(remote.column("embedding").to_pylist()),
                               np.array(local.column("embedding").to_pylist()), atol=1e-5)
    # Loose images under a URI prefix embed too (classes from the first folder).
    for f in sorted(photos.rglob("*.jpg"))[:4]:
        storage.write_bytes(storage.join(s3_bucket, "loose", f.relative_to(photos).as_posix()), f.read_bytes())
    assert _cli("registry", "--tracking-uri", uri, "embed", f"{model}/1", storage.join(s3_bucket, "loose"),
                str(tmp_path / "loose.parquet")) == 0
    assert pq.read_table(tmp_path / "loose.parquet").num_rows == 4
    capsys.readouterr()
    assert _cli("evaluate", f"{model}/1", ds, "--tracking-uri", uri, "--linear-epochs", "0") == 0
    printed = capsys.readouterr().out
    assert "on photos (8 train / 4 test images, 32x32)" in printed and "knn_top1" in printed
