import numpy as np
import pytest
import scipy.ndimage
import torch

from reconad import maps


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (3, 1, 17, 40), (2, 1, 5, 9)])
def test_gaussian_blur_equals_scipy(shape):
    rng = np.random.default_rng(0)
    x = rng.random(shape)
    ours = maps.gaussian_blur(torch.from_numpy(x), sigma=4).numpy()
    ref = np.stack([[scipy.ndimage.gaussian_filter(m[0], sigma=4)] for m in x])
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_gaussian_blur_float32_and_other_sigma():
    x = np.random.default_rng(1).random((2, 1, 33, 31)).astype(np.float32)
    ours = maps.gaussian_blur(torch.from_numpy(x), sigma=2.5, truncate=3.0)
    assert ours.dtype == torch.float32
    ref = np.stack([[scipy.ndimage.gaussian_filter(m[0].astype(np.float64), sigma=2.5, truncate=3.0)] for m in x])
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)


def test_kernel_matches_scipy_radius():
    kernel = maps.gaussian_kernel1d(4.0)
    assert kernel.numel() == 33  # radius int(4*4 + 0.5) = 16
    assert torch.isclose(kernel.sum(), torch.tensor(1.0, dtype=kernel.dtype))


def test_cosine_distance_map_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # pixel0 = (1,0), pixel1 = (0,1)
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)  # both (1,0)
    d = maps.cosine_distance_map(a, b)
    assert d.shape == (1, 1, 1, 2)
    torch.testing.assert_close(d, torch.tensor([[[[0.0, 1.0]]]]))


def test_upsample_align_corners_switch():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    up_true = maps.upsample(x, (4, 4), align_corners=True)
    up_false = maps.upsample(x, (4, 4), align_corners=False)
    assert up_true[0, 0, 0, 0] == 0 and up_true[0, 0, -1, -1] == 3  # corners kept exactly
    assert not torch.equal(up_true, up_false)


def test_fuse_modes():
    a, b = torch.ones(1, 1, 2, 2), 3 * torch.ones(1, 1, 2, 2)
    assert maps.fuse([a, b], "sum").mean() == 4
    assert maps.fuse([a, b], "mean").mean() == 2
    assert maps.fuse([a, b], weights=[0.5, 0.5]).mean() == 2
    with pytest.raises(ValueError, match="fuse mode"):
        maps.fuse([a, b], "prod")


def test_image_scores():
    m = torch.arange(100.0).reshape(1, 1, 10, 10)
    assert maps.image_score(m, "max").item() == 99
    assert maps.image_score(m, "mean").item() == pytest.approx(49.5)
    assert maps.image_score(m, "topk", topk=0.05).item() == pytest.approx(np.mean([95, 96, 97, 98, 99]))
    with pytest.raises(ValueError):
        maps.image_score(m, "median")


def test_anomaly_map_is_sum_of_upsampled_levels_then_blur():
    torch.manual_seed(0)
    pairs = [(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)), (torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4))]
    cfg = maps.MapsConfig(sigma=0)
    out = maps.anomaly_map(pairs, (16, 16), cfg)
    expected = sum(torch.nn.functional.interpolate(1 - torch.cosine_similarity(t, r, 1).unsqueeze(1), (16, 16),
                                                   mode="bilinear", align_corners=True) for t, r in pairs)
    torch.testing.assert_close(out, expected)
    blurred = maps.anomaly_map(pairs, (16, 16), maps.MapsConfig(sigma=4))
    ref = np.stack([[scipy.ndimage.gaussian_filter(m[0].double().numpy(), 4)] for m in expected])
    np.testing.assert_allclose(blurred.numpy(), ref, atol=1e-6)


def test_gaussian_blur_torch_reflect_padding_equals_conv2d_with_reflect_pad():
    x = torch.rand(2, 1, 40, 37, dtype=torch.float64)
    kernel = maps.gaussian_kernel1d(4.0)
    k2 = (kernel[:, None] * kernel[None, :])[None, None]
    padded = torch.nn.functional.pad(x, (16, 16, 16, 16), mode="reflect")
    torch.testing.assert_close(maps.gaussian_blur(x, 4.0, padding="reflect"), torch.nn.functional.conv2d(padded, k2))
    with pytest.raises(ValueError, match="padding"):
        maps.gaussian_blur(x, 4.0, padding="circular")


def test_zero_padded_5x5_blur_equals_torch_conv():
    # ReContrast multi-class scripts: 5x5 Gaussian (σ 4) conv with zero padding = truncate 0.5, padding "zeros"
    x = torch.rand(2, 1, 20, 23)
    kernel = maps.gaussian_kernel1d(4.0, truncate=0.5, dtype=torch.float32)
    assert kernel.numel() == 5
    k2 = (kernel[:, None] * kernel[None, :])[None, None]
    expected = torch.nn.functional.conv2d(x, k2, padding=2)
    torch.testing.assert_close(maps.gaussian_blur(x, 4.0, truncate=0.5, padding="zeros"), expected)
    cfg = maps.MapsConfig(sigma=4.0, truncate=0.5, padding="zeros")
    pairs = [(torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5))]
    raw = maps.anomaly_map(pairs, (20, 20), maps.MapsConfig(sigma=0))
    torch.testing.assert_close(maps.anomaly_map(pairs, (20, 20), cfg),
                               torch.nn.functional.conv2d(raw, k2, padding=2))


# -- channel_norm / channel_cosine / channel_normalize: torch's results bit for bit -----------------------------------
CHANNEL_SHAPES = [(8, 24, 32, 32), (1, 24, 32, 32), (8, 40, 16, 16), (2, 256, 64, 64), (1, 512, 32, 32),
                  (4, 7, 16, 16)]


def _features(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    y = x + torch.randn(shape, generator=g)
    x[0, :, 0, 0] = 0.0  # a zero vector: the eps clamp
    return x, y


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
def test_channel_ops_equal_torch_bit_for_bit(shape, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, y = _features(shape)
        assert maps._sequential_norm_applies(x)  # the fast path is what is tested here
        assert torch.equal(maps.channel_norm(x), torch.linalg.vector_norm(x, 2, dim=1, keepdim=True))
        assert torch.equal(maps.channel_cosine(x, y), torch.nn.functional.cosine_similarity(x, y, dim=1))
        assert torch.equal(maps.channel_normalize(x), torch.nn.functional.normalize(x, dim=1))
        assert torch.equal(maps.cosine_distance_map(x, y),
                           (1.0 - torch.nn.functional.cosine_similarity(x, y, dim=1)).unsqueeze(1))
    finally:
        torch.set_num_threads(before)


def test_sequential_norm_is_what_the_fast_path_computes():
    """The probe agrees with torch on this machine, and the fast path's own sum is the one used (not torch's)."""
    x, _ = _features((2, 24, 32, 32))
    assert maps._sequential_norm_matches_torch(24, torch.get_num_threads())
    squares = x * x
    plain = torch.zeros_like(squares[:, 0])
    for c in range(24):
        plain = plain + squares[:, c]
    assert torch.equal(maps._sequential_channel_norm(x)[:, 0], plain.double().sqrt().float())


@pytest.mark.parametrize("case", ["small", "grad", "float64", "channels_last", "broadcast"])
def test_channel_ops_fall_back_to_torch(case):
    x, y = _features((2, 24, 32, 32))
    if case == "small":  # fewer positions than the loop pays off for
        x, y = x[:, :, :8, :8].contiguous(), y[:, :, :8, :8].contiguous()
    elif case == "grad":
        x.requires_grad_(True)
    elif case == "float64":
        x, y = x.double(), y.double()
    elif case == "channels_last":
        x, y = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
    else:
        y = y[:1]
    assert not (maps._sequential_norm_applies(x) and maps._sequential_norm_applies(y) and x.shape == y.shape)
    ref = torch.nn.functional.cosine_similarity(x, y, dim=1)
    out = maps.channel_cosine(x, y)
    assert torch.equal(out, ref)
    if case == "grad":  # the autograd graph is torch's own: same gradient
        out.sum().backward()
        g = x.grad.clone()
        x.grad = None
        ref.sum().backward()
        assert torch.equal(x.grad, g)


def test_channel_norm_keeps_torch_where_the_probe_disagrees(monkeypatch):
    x, _ = _features((2, 24, 32, 32))
    monkeypatch.setattr(maps, "_sequential_norm_matches_torch", lambda channels, threads: False)
    monkeypatch.setattr(maps, "_sequential_channel_norm", lambda t: pytest.fail("the probe said no"))
    assert torch.equal(maps.channel_norm(x), torch.linalg.vector_norm(x, 2, dim=1, keepdim=True))
    assert torch.equal(maps.channel_cosine(x, x + 1), torch.nn.functional.cosine_similarity(x, x + 1, dim=1))
    assert torch.equal(maps.channel_normalize(x), torch.nn.functional.normalize(x, dim=1))


@pytest.mark.parametrize("eager_first", [True, False])
def test_channel_cosine_in_a_trace_equals_eager(monkeypatch, eager_first):
    """A TorchScript trace (eval.trace) records the probed fast path after an eager call, torch's op before one;
    both reproduce the eager maps bit for bit and no probe runs inside the trace."""
    import warnings

    monkeypatch.setattr(maps, "_NORM_PROBES", {})
    x, y = _features((2, 24, 32, 32))

    class Distance(torch.nn.Module):
        def forward(self, a, b):
            return maps.cosine_distance_map(a, b)

    with torch.inference_mode():
        eager = Distance()(x, y) if eager_first else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(Distance(), (x, y), check_trace=False, strict=False)
        ops = {node.kind() for node in traced.graph.nodes()}
        assert ("aten::cosine_similarity" in ops) is not eager_first  # torch's op unless probed eagerly
        assert "aten::linalg_vector_norm" not in ops
        assert list(maps._NORM_PROBES) == ([(24, torch.get_num_threads())] if eager_first else [])
        assert torch.equal(traced(x, y), eager if eager_first else Distance()(x, y))


def test_torch_channel_ops_block_keeps_torchs_functions(monkeypatch):
    """Inside ``torch_channel_ops`` (exports, the benchmarks' official-style reference) the fast path never runs;
    outside it runs again."""
    x, y = _features((2, 24, 32, 32))
    fast = maps._sequential_channel_norm
    calls = []
    monkeypatch.setattr(maps, "_sequential_channel_norm", lambda t: calls.append(1) or fast(t))
    with maps.torch_channel_ops():
        inside = maps.cosine_distance_map(x, y)
        assert not maps._sequential_norm_applies(x) and not calls
    assert torch.equal(maps.cosine_distance_map(x, y), inside) and calls
