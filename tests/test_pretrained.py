"""``sib-train --pretrained``: weights from a file or from torchvision's / timm's local caches (never
downloaded), the classifier re-initialised for another number of classes, every other mismatch
and every unusable file one line naming what is wrong; the weights reach the checkpoint that
``sib-eval`` rebuilds."""
import json
import socket

import pytest
import torch

from sib_fast import train
from sib_fast.cli_errors import UsageError
from sib_fast.training import pretrained
from sib_fast.training.checkpoint import CHECKPOINT
from sib_fast.training.models import build_model
from sib_fast.training.prepare import CONFIG

from cli_runs import TINY, _restore_threads  # noqa: F401  (an autouse fixture)

ONE_STEP = ["--train-samples", "8", "--epochs", "1", "--lr", "1e-9"]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Nothing may try to download: any connection fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _run(tmp_path, *args, name="run"):
    out = tmp_path / name
    return train.main([*TINY, "--output", str(out), *args]), out


def _weights(num_classes=3, seed=123, arch="tiny_cnn"):
    torch.manual_seed(seed)
    return build_model(arch, num_classes, 16).state_dict()


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize("wrap", ["state_dict", "model", "model_state_dict", "ddp_prefix"])
def test_a_file_fine_tunes_from_its_weights(tmp_path, capsys, wrap):
    sd = _weights()
    obj = {"state_dict": sd, "model": {"model": sd, "epoch": 3}, "model_state_dict": {"model_state_dict": sd},
           "ddp_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "weights.pth")
    code, out = _run(tmp_path, "--arch", "tiny_cnn", "--pretrained", str(tmp_path / "weights.pth"), *ONE_STEP)
    assert code == 0
    log = capsys.readouterr().out
    assert f"--pretrained {tmp_path / 'weights.pth'}: loaded" in log and "re-initialised" not in log
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 1
    assert (ckpt["model"]["0.weight"] - sd["0.weight"]).abs().max() < 1e-6  # one step at lr 1e-9
    assert not torch.equal(ckpt["model"]["0.weight"], _weights(seed=0)["0.weight"])
    assert ckpt["pretrained"]["file"] == str(tmp_path / "weights.pth") and ckpt["pretrained"]["left_out"] == []
    assert json.loads((out / CONFIG).read_text())["pretrained"] == str(tmp_path / "weights.pth")
    assert ckpt["args"]["lr"] == 1e-9


def test_the_fine_tuned_checkpoint_is_rebuilt_by_sib_eval_and_is_itself_a_pretrained_file(tmp_path, capsys):
    from sib_fast.evaluation.inputs import build, load_run
    torch.save(_weights(), tmp_path / "w.pt")
    code, out = _run(tmp_path, "--arch", "tiny_cnn", "--pretrained", str(tmp_path / "w.pt"), *ONE_STEP)
    assert code == 0
    run = load_run(str(out))
    model = build(run, 3, torch.device("cpu"))
    assert torch.equal(model.model.state_dict()["0.weight"], run["state"]["0.weight"])
    # sib-train's own checkpoint.pt (weights under "model") as the start of another run
    code, again = _run(tmp_path, "--arch", "tiny_cnn", "--pretrained", str(out / CHECKPOINT), *ONE_STEP,
                       name="again")
    assert code == 0
    w = torch.load(again / CHECKPOINT, weights_only=True)["model"]["0.weight"]
    assert (w - run["state"]["0.weight"]).abs().max() < 1e-6


def test_another_number_of_classes_reinitialises_the_classifier_and_says_so(tmp_path, capsys):
    sd = _weights(num_classes=10)
    torch.save(sd, tmp_path / "ten.pt")
    code, out = _run(tmp_path, "--arch", "tiny_cnn", "--pretrained", str(tmp_path / "ten.pt"), *ONE_STEP)
    assert code == 0
    log = capsys.readouterr().out
    assert "the classifier (8.bias, 8.weight) is re-initialised for 3 classes (the file has 10)" in log, log
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert ckpt["model"]["8.weight"].shape == (3, 16)
    assert (ckpt["model"]["3.weight"] - sd["3.weight"]).abs().max() < 1e-6
    assert ckpt["pretrained"]["left_out"] == ["8.bias", "8.weight"]


def test_other_mismatches_are_errors_naming_the_keys(tmp_path, capsys):
    sd = _weights()
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "3.weight"}, ["missing 3.weight"]),
        "unexpected": ({**sd, "extra.weight": torch.zeros(2)}, ["unexpected extra.weight"]),
        "shape": ({**sd, "0.weight": torch.zeros(8, 3, 5, 5)}, ["shapes differ for 0.weight", "(8, 3, 5, 5)"]),
        "other_model": (_weights(arch="sib_cnn"), ["missing", "unexpected", "features."]),
    }
    for name, (state, words) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        code, out = _run(tmp_path, "--arch", "tiny_cnn", "--pretrained", str(tmp_path / f"{name}.pt"), *ONE_STEP,
                         name=name)
        assert code == 2, name
        _one_line_error(capsys, "does not fit", *words)
        assert not out.exists(), "a bad --pretrained leaves no output folder"


def test_unusable_files_are_one_line(tmp_path, capsys):
    torch.save(_weights(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"not a weights file\n")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "nostate.pt")
    cases = [("missing.pt", ["no such file"]), ("cut.pt", ["damaged"]), ("empty.pt", ["empty"]),
             ("text.pt", ["damaged or not a PyTorch weights file"]), ("nostate.pt", ["holds no state dict", "epoch"])]
    for name, words in cases:
        code, out = _run(tmp_path, "--arch", "tiny_cnn", "--pretrained", str(tmp_path / name), *ONE_STEP)
        assert code == 2, name
        _one_line_error(capsys, str(tmp_path / name), *words)
        assert not out.exists()
    code, _ = _run(tmp_path, "--pretrained", "IMAGENET1K_V1")  # a name for a built-in model
    assert code == 2
    _one_line_error(capsys, "needs a torchvision or timm --arch")


def _fake_torchvision_cache(tmp_path, monkeypatch, arch="resnet18", name="IMAGENET1K_V1"):
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    weights = torchvision.models.get_model_weights(arch)[name]
    path = tmp_path / "torch_home" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    return weights, path


def test_a_torchvision_weights_name_loads_from_the_cache_only(tmp_path, monkeypatch, capsys):
    torchvision = pytest.importorskip("torchvision")
    weights, path = _fake_torchvision_cache(tmp_path, monkeypatch)
    # not cached: one line saying where it looked and how to give a file
    code, out = _run(tmp_path, "--arch", "resnet18", "--pretrained", "IMAGENET1K_V1", "--no-sib", *ONE_STEP)
    assert code == 2 and not out.exists()
    _one_line_error(capsys, "not in the cache", str(path), "--pretrained FILE", "nothing is downloaded")
    code, _ = _run(tmp_path, "--arch", "resnet18", "--pretrained", "IMAGENET1K_V9", "--no-sib", *ONE_STEP)
    assert code == 2
    _one_line_error(capsys, "IMAGENET1K_V1, DEFAULT")
    # cached: an ImageNet state dict under torchvision's file name (1000 classes)
    torch.manual_seed(7)
    sd = torchvision.models.resnet18(num_classes=1000).state_dict()
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    for spec in ("IMAGENET1K_V1", "DEFAULT"):
        source = pretrained.locate(spec, "resnet18")
        assert source.path == path and source.kind == "torchvision"
    code, out = _run(tmp_path, "--arch", "resnet18", "--pretrained", "IMAGENET1K_V1", "--no-sib", *ONE_STEP)
    assert code == 0
    log = capsys.readouterr().out
    assert "the classifier (fc.bias, fc.weight) is re-initialised for 3 classes (the file has 1000)" in log
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert (ckpt["model"]["conv1.weight"] - sd["conv1.weight"]).abs().max() < 1e-6
    assert ckpt["pretrained"]["kind"] == "torchvision"


def test_a_timm_tag_loads_from_the_hugging_face_cache_only(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(UsageError, match=r"not in the cache \(looked for .*models--timm--resnet10t\.c3_in1k"):
        pretrained.locate("default", "resnet10t")
    with pytest.raises(UsageError, match="pretrained tags are default, c3_in1k"):
        pretrained.locate("no_such_tag", "resnet10t")
    folder = tmp_path / "hf" / "models--timm--resnet10t.c3_in1k"
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc123")
    torch.manual_seed(5)
    sd = timm.create_model("resnet10t", pretrained=False, num_classes=1000).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "snapshots" / "abc123" / "model.safetensors"))
    for spec in ("default", "c3_in1k"):
        source = pretrained.locate(spec, "resnet10t")
        assert source.path.name == "model.safetensors" and source.classifier == "fc"
    model = build_model("resnet10t", 4, 32)
    left_out, line = pretrained.load_into(model, source, 4)
    assert left_out == ["fc.bias", "fc.weight"] and "(the file has 1000)" in line
    assert torch.equal(model.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])
