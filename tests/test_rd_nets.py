"""RD4AD's networks against the official structure (official_code.md §1.3–1.4, official_keys/rd4ad.json)."""

import json
from pathlib import Path

import pytest
import torch

from reconad.nets.rd import OCBE, Decoder, count_parameters, default_arch

# a copy of spec/official_keys/rd4ad.json, so the tests do not depend on files outside the repository
OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_keys" / "rd4ad.json"
WRN_TAPS = (256, 512, 1024)


def _official_keys() -> dict[str, list[int]]:
    return json.loads(OFFICIAL_KEYS.read_text())["keys"]


def test_wrn50_parameter_counts_match_spec():
    # spec §1.9: effective OCBE 58.89 M (67.28 M with the dead conv4/bn4), decoder 24.92 M
    assert round(count_parameters(OCBE(WRN_TAPS)) / 1e6, 2) == 58.89
    assert round(count_parameters(OCBE(WRN_TAPS, dead_conv4=True)) / 1e6, 2) == 67.28
    assert round(count_parameters(Decoder(WRN_TAPS, 2048)) / 1e6, 2) == 24.92


def test_keys_and_shapes_equal_the_official_layout():
    official = {k: v for k, v in _official_keys().items() if not k.startswith("encoder.")}
    ours = {f"bn.{k}": list(v.shape) for k, v in OCBE(WRN_TAPS, dead_conv4=True).state_dict().items()}
    ours |= {f"decoder.{k}": list(v.shape) for k, v in Decoder(WRN_TAPS, 2048).state_dict().items()}
    assert ours == official


def test_decoder_output_order_and_shapes():
    ocbe, dec = OCBE(WRN_TAPS), Decoder(WRN_TAPS, 2048)
    feats = [torch.randn(1, 256, 16, 16), torch.randn(1, 512, 8, 8), torch.randn(1, 1024, 4, 4)]
    z = ocbe(feats)
    assert z.shape == (1, 2048, 2, 2)
    assert [tuple(t.shape) for t in dec(z)] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4)]


def test_block_counts_and_transposed_convs():
    dec = Decoder(WRN_TAPS, 2048)
    assert (len(dec.layer1), len(dec.layer2), len(dec.layer3)) == (3, 4, 6)
    assert isinstance(dec.layer1[0].conv2, torch.nn.ConvTranspose2d)
    assert isinstance(dec.layer1[0].upsample[0], torch.nn.ConvTranspose2d)
    assert isinstance(dec.layer1[1].conv2, torch.nn.Conv2d)


def test_conv_transpose_keeps_pytorch_default_init():
    # parity §1.4: only nn.Conv2d gets kaiming_normal(fan_out); ConvTranspose2d keeps kaiming_uniform(a=√5)
    torch.manual_seed(0)
    dec = Decoder(WRN_TAPS, 2048)
    w = dec.layer1[0].conv2.weight.detach()  # (512, 512, 2, 2); default bound = 1/sqrt(fan_in), fan_in = 512·2·2
    bound = 1 / (512 * 4) ** 0.5
    assert w.abs().max() <= bound + 1e-9
    assert w.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)  # uniform(-b, b) has std b/√3
    conv = dec.layer1[1].conv2.weight.detach()  # kaiming_normal fan_out: std = sqrt(2 / (out·k·k))
    assert conv.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)


@pytest.mark.parametrize("name,taps", [("resnet18", (64, 128, 256)), ("efficientnet_lite0", (24, 40, 112))])
def test_other_backbone_channels(name, taps):
    arch = default_arch(name)
    ocbe = OCBE(taps, arch.block, arch.width_ratio, arch.oce_blocks)
    dec = Decoder(taps, ocbe.out_channels, arch.block, arch.width_ratio, arch.decoder_blocks)
    feats = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(taps)]
    outs = dec(ocbe(feats))
    assert [o.shape for o in outs] == [f.shape for f in feats]


def test_heads_return_head_major_order():
    dec = Decoder((8, 16, 32), 64, n_heads=2)
    outs = dec(torch.randn(1, 64, 2, 2))
    assert [o.shape[1] for o in outs] == [8, 16, 32, 8, 16, 32]
