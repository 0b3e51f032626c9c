"""load_official: a state dict in the official RD4AD layout loads onto our RD4AD and gives identical outputs."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from reconad.backbones import WeightsUnavailableError, create_backbone
from reconad.errors import ReconadError
from reconad.official import load_official, rename_official, to_official
from reconad.registry import create_method

# a copy of spec/official_keys/rd4ad.json, so the tests do not depend on files outside the repository
OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_keys" / "rd4ad.json"


def official_layout_state(model) -> dict[str, torch.Tensor]:
    """Our weights renamed to the official names, plus the official-only tensors (layer4, fc, conv4/bn4)."""
    spec = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    state = to_official("rd4ad", model.state_dict())
    for key, shape in spec.items():
        if key not in state:
            state[key] = torch.zeros(shape, dtype=torch.long if key.endswith("num_batches_tracked") else torch.float)
    return state


@pytest.fixture(scope="module")
def wrn_model():
    torch.manual_seed(0)
    backbone = create_backbone("wide_resnet50_2", weights=None)
    model = create_method("rd4ad", backbone=backbone).eval()
    for m in model.modules():  # non-trivial BN statistics, so a wrong mapping cannot go unnoticed
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_official_key_set_is_exactly_the_spec(wrn_model):
    spec = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    state = official_layout_state(wrn_model)
    assert {k: list(v.shape) for k, v in state.items()} == spec


def test_load_official_gives_identical_outputs(wrn_model):
    state = official_layout_state(wrn_model)
    loaded = load_official("rd4ad", state)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), wrn_model(images), rtol=0, atol=0)


def test_nested_checkpoint_file_as_the_official_script_saves_it(wrn_model, tmp_path):
    # the RD4AD script saves {"bn": bn.state_dict(), "decoder": decoder.state_dict()}; the encoder comes from
    # ImageNet weights, here a local file path instead of a download
    flat = official_layout_state(wrn_model)
    nested = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
              for part in ("bn", "decoder")}
    torch.save(nested, tmp_path / "wres50_carpet.pth")
    encoder_file = tmp_path / "encoder.pth"
    torch.save(wrn_model.backbone.state_dict(), encoder_file)
    loaded = load_official("rd4ad", tmp_path / "wres50_carpet.pth", backbone_weights=str(encoder_file))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), wrn_model(images), rtol=0, atol=0)


def test_foreign_keys_and_shapes_are_reported():
    with pytest.raises(KeyError, match="not part of the official rd4ad layout"):
        rename_official("rd4ad", {"generator.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        rename_official("nope", {})
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official("rd4ad", "missing.pth")


class _Payload:
    """Unpickling this creates ``marker``: stands for any code a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_malicious_official_checkpoint_is_refused_without_running_it(wrn_model, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "wres50_carpet.pth"
    state = official_layout_state(wrn_model)
    state["bn.conv1.weight"] = _Payload(marker)
    torch.save({"bn": state, "decoder": {}}, evil)
    with pytest.raises(WeightsUnavailableError) as info:
        load_official("rd4ad", evil, backbone_weights=None)
    message = str(info.value)
    assert not marker.exists(), "the checkpoint's code ran"
    assert "\n" not in message and str(evil) in message and "safetensors" in message and "code execution" in message
    torch.load(evil, weights_only=False)
    assert marker.exists()  # the payload is live: an unsafe reader would have run it


def test_safetensors_official_checkpoint_and_weights_source(wrn_model, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "rd4ad_official.safetensors"
    save_file(official_layout_state(wrn_model), str(path))
    loaded = load_official("rd4ad", path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert loaded.backbone.weights_source == f"file:{path} sha256:{digest}"
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), wrn_model(images), rtol=0, atol=0)
    in_memory = load_official("rd4ad", official_layout_state(wrn_model))
    assert in_memory.backbone.weights_source == "official state dict"


def test_official_errors_are_reconad_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="missing.pth"):
        load_official("rd4ad", tmp_path / "missing.pth")
    with pytest.raises(ReconadError, match="not part of the official rd4ad layout"):
        rename_official("rd4ad", {"generator.weight": torch.zeros(1)})
    with pytest.raises(ReconadError, match="no official checkpoint layout for 'ssl_ae'"):
        rename_official("ssl_ae", {})
