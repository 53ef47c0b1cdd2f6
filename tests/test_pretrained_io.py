"""Loading weights safely, saving them back, and exporting: every path and every error."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import zoo
import zoo.models.pretrained as pretrained_mod
from zoo.export import export_and_check
from zoo.hub import from_pretrained, save_pretrained
from zoo.models.pretrained import CheckpointError

NAME = "zoo_poolformer_mini_32"


def make(name: str = NAME, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.create_model(name, num_classes=10, **kw).eval()


def same_outputs(a, b, size: int = 32) -> bool:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


class _CreatesFile:
    """Unpickling this runs os.system: a checkpoint that tries to execute code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _CreatesFile(target)}}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused or unreadable"):
        zoo.create_model(NAME, pretrained=str(path))
    assert not target.exists()


def test_torch_file_in_zoo_layout_loads(tmp_path):
    ref = make()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "w.pt")
    assert same_outputs(zoo.create_model(NAME, num_classes=10, pretrained=str(tmp_path / "w.pt")), ref)


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(make().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"w\.safetensors: not a readable safetensors file"):
        zoo.create_model(NAME, num_classes=10, pretrained=str(path))


def test_corrupt_torch_file_names_the_file(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        zoo.create_model(NAME, pretrained=str(path))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        zoo.create_model(NAME, pretrained=str(tmp_path / "nope.safetensors"))


def test_other_architecture_lists_missing_unexpected_and_shapes(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file(make("zoo_vit_mini_32").state_dict(), str(path))
    with pytest.raises(CheckpointError) as err:
        zoo.create_model(NAME, num_classes=10, pretrained=str(path))
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing" in msg and "unexpected" in msg and "more" in msg


def test_new_class_count_reinitialises_head_and_says_so(tmp_path):
    ref = make()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.warns(UserWarning, match="10 classes, the model 3: re-initialised"):
        model = zoo.create_model(NAME, num_classes=3, pretrained=str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(model.stages[0].embed.proj.weight, ref.stages[0].embed.proj.weight)


def test_other_in_chans_adapts_the_stem(tmp_path):
    ref = make()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    gray = zoo.create_model(NAME, num_classes=10, in_chans=1, pretrained=str(tmp_path / "w.safetensors")).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # timm's adaptation sums the RGB filters: a gray image gives the RGB output
        torch.testing.assert_close(gray(x), ref(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_features_only_with_pretrained(tmp_path):
    ref = make()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    fx = zoo.create_model(NAME, num_classes=10, features_only=True, pretrained=str(tmp_path / "w.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, expected = ref.forward_intermediates(x)
        for a, b in zip(fx(x), expected):
            torch.testing.assert_close(a, b)


def test_save_pretrained_round_trip(tmp_path):
    ref = make(drop_path_rate=0.1, token_mixer="identity")
    save_pretrained(ref, tmp_path / "saved", metadata={"top1": 99.0})
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architecture"] == NAME and config["metadata"] == {"top1": 99.0}
    # timm's Hugging Face layout (timm.models.save_for_hf): our overrides are its model_args
    assert config["num_classes"] == 10 and config["num_features"] == ref.num_features
    assert config["pretrained_cfg"]["mean"] == list(ref.pretrained_cfg["mean"])
    assert config["model_args"]["num_classes"] == 10 and config["model_args"]["drop_path_rate"] == 0.1
    assert {s["token_mixer"] for s in config["model_args"]["stages"]} == {"identity"}
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    again = from_pretrained(tmp_path / "saved")
    assert same_outputs(again, ref)
    # the folder also loads into a model built by name, as any pretrained path
    by_name = zoo.create_model(NAME, num_classes=10, token_mixer="identity", pretrained=str(tmp_path / "saved"))
    assert same_outputs(by_name, ref)


def _timm_local_dir(path, **kw):
    import timm

    return timm.create_model(f"local-dir:{path}", pretrained=True, **kw)


def test_timm_local_dir_builds_the_saved_model(tmp_path):
    """timm.create_model("local-dir:PATH") on a zoo folder: the same classes, mixer and outputs."""
    ref = make(token_mixer="identity")
    save_pretrained(ref, tmp_path / "saved")
    again = _timm_local_dir(tmp_path / "saved")
    assert again.num_classes == 10 and again.spec.stages[0].token_mixer == "identity"
    assert same_outputs(again, ref)
    assert again.pretrained_cfg["source"] == "local-dir"
    baseline = make("resnet10t")
    save_pretrained(baseline, tmp_path / "r10")
    assert same_outputs(_timm_local_dir(tmp_path / "r10"), baseline)


def test_folder_saved_before_timm_layout_still_loads(tmp_path):
    """The first zoo layout ({architecture, overrides, format, metadata}) loads through both doors."""
    ref = make(token_mixer="identity")
    save_pretrained(ref, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    old = {"architecture": NAME, "overrides": config["model_args"], "format": "zoo", "metadata": {}}
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    assert same_outputs(from_pretrained(tmp_path / "old"), ref)
    assert same_outputs(_timm_local_dir(tmp_path / "old"), ref)


@pytest.mark.parametrize(
    "write, match",
    [
        (None, r"config\.json: no such file"),
        ("{not json", r"config\.json: not valid JSON"),
        ('{"architecture": "zoo_nope"}', r"config\.json: unknown architecture 'zoo_nope'"),
        ('{"architecture": "zoo_poolformer_mini_32", "model_args": [1]}', r"config\.json: 'model_args' must be"),
    ],
)
def test_bad_folder_is_one_line_naming_the_file(tmp_path, write, match):
    save_pretrained(make(), tmp_path / "f")
    if write is None:
        (tmp_path / "f" / "config.json").unlink()
    else:
        (tmp_path / "f" / "config.json").write_text(write)
    with pytest.raises(CheckpointError, match=match) as info:
        from_pretrained(tmp_path / "f")
    assert "\n" not in str(info.value)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    """A config naming another model than the weights: an error naming the file, never another model."""
    save_pretrained(make(), tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    config["model_args"] = {"num_classes": 10, "mlp_ratio": 2.0}
    (tmp_path / "f" / "config.json").write_text(json.dumps(config))
    for load in (from_pretrained, _timm_local_dir):
        with pytest.raises(CheckpointError, match=r"model\.safetensors: weights do not fit zoo_poolformer_mini_32"):
            load(tmp_path / "f")


def test_save_pretrained_baseline(tmp_path):
    ref = make("resnet18")
    save_pretrained(ref, tmp_path / "r18")
    assert same_outputs(from_pretrained(tmp_path / "r18"), ref)
    gray = make("resnet18", in_chans=1)
    save_pretrained(gray, tmp_path / "gray")
    again = from_pretrained(tmp_path / "gray")
    assert again.conv1.in_channels == 1
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), gray(x))


def test_metadata_cannot_overwrite_the_architecture(tmp_path):
    save_pretrained(make(), tmp_path / "m", metadata={"architecture": "zoo_vit_mini_32"})
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architecture"] == NAME
    assert same_outputs(from_pretrained(tmp_path / "m"), make())


def _fake_manifest(tmp_path, monkeypatch, model, *, corrupt: bool = False):
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    digest = hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    if corrupt:
        digest = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps({NAME: {"file": "w.safetensors", "sha256": digest}}))
    monkeypatch.setattr(pretrained_mod, "WEIGHTS_DIR", tmp_path)


def test_shipped_weights_load_by_name(tmp_path, monkeypatch):
    ref = make()
    _fake_manifest(tmp_path, monkeypatch, ref)
    assert same_outputs(zoo.create_model(NAME, num_classes=10, pretrained=True), ref)


def test_missing_weights_folder_names_where_it_looked(tmp_path, monkeypatch):
    # A wheel install has no weights/ beside zoo/: the error says where it looked and what to do.
    monkeypatch.setattr(pretrained_mod, "WEIGHTS_DIR", tmp_path / "weights")
    with pytest.raises(CheckpointError, match=r"weights/manifest.json: not found; .*ZOO_WEIGHTS"):
        zoo.create_model(NAME, num_classes=10, pretrained=True)


def test_zoo_weights_environment_variable_names_the_folder(tmp_path):
    code = "from zoo.models import pretrained; print(pretrained.WEIGHTS_DIR)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ZOO_WEIGHTS": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == str(tmp_path)


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch):
    _fake_manifest(tmp_path, monkeypatch, make(), corrupt=True)
    with pytest.raises(CheckpointError, match=r"sha256 .* does not match the manifest"):
        zoo.create_model(NAME, num_classes=10, pretrained=True)


def test_name_without_shipped_weights_lists_those_with(tmp_path, monkeypatch):
    _fake_manifest(tmp_path, monkeypatch, make())
    with pytest.raises(CheckpointError, match=f"no shipped weights for 'zoo_vit_mini_32'; weights/ has: {NAME}"):
        zoo.create_model("zoo_vit_mini_32", pretrained=True)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
@pytest.mark.parametrize("name", [*zoo.list_models("zoo_*mini*"), "resnet10t"])
def test_export_round_trip(name, fmt, tmp_path):
    """Every family's small-image variant and the baseline, checked on another batch size."""
    diff = export_and_check(make(name), fmt, tmp_path / f"m.{fmt}", img_size=32)
    assert diff <= 1e-4


def test_timm_pretrained_cfg_overlay_file_is_honoured_and_remote_refused(tmp_path):
    import timm

    ref = make()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    via_timm = timm.create_model(
        NAME, pretrained=True, num_classes=10, pretrained_cfg_overlay={"file": str(tmp_path / "w.safetensors")}
    )
    assert same_outputs(via_timm, ref)
    with pytest.raises(ValueError, match="pretrained_cfg_overlay: hf_hub_id not supported; zoo loads local files"):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay={"hf_hub_id": "someone/weights"})
