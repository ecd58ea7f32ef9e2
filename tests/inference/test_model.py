"""The network: shapes, size, determinism and the 2.5D input it is fed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from inference.findings import CLASSES, SUBTYPES
from inference.model import HemorrhageNet, ModelConfig, count_parameters
from inference.windows import (
    WINDOWS,
    apply_windows,
    input_channels,
    neighbour_index,
    prepare_volume,
)


def test_outputs_have_the_documented_shapes() -> None:
    config = ModelConfig(base_width=8, input_size=64)
    model = HemorrhageNet(config).eval()
    with torch.inference_mode():
        out = model(torch.rand(3, config.in_channels, 64, 64))
    assert out["cls"].shape == (3, len(CLASSES))
    assert out["seg"].shape == (3, len(SUBTYPES), 64, 64)
    assert out["features"].shape == (3, 8 * 2**config.depth, 8, 8)


def test_default_network_is_small_enough_to_bundle() -> None:
    model = HemorrhageNet(ModelConfig())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert buf.tell() <= 10 * 1024 * 1024
    assert 100_000 < count_parameters(model) < 2_500_000


def test_same_seed_gives_the_same_network_and_outputs() -> None:
    x = torch.rand(2, 9, 64, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = HemorrhageNet(ModelConfig(base_width=8, input_size=64)).eval()
        with torch.inference_mode():
            outs.append(model(x)["cls"])
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(4)
    other = HemorrhageNet(ModelConfig(base_width=8, input_size=64)).eval()
    with torch.inference_mode():
        assert not torch.equal(other(x)["cls"], outs[0])


def test_config_round_trip_and_unknown_keys() -> None:
    config = ModelConfig(base_width=12, input_size=96)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "heads": 3})


def test_windows_map_hu_to_unit_range() -> None:
    hu = torch.tensor([[[-1000.0, 0.0, 40.0, 80.0, 2000.0]]])
    win = apply_windows(hu)
    assert win.shape == (1, len(WINDOWS), 1, 5)
    brain = win[0, 0, 0]
    assert brain.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    assert float(win.min()) >= 0.0 and float(win.max()) <= 1.0


def test_neighbours_replicate_the_edges() -> None:
    assert neighbour_index(1).tolist() == [[0, 0, 0]]
    assert neighbour_index(3).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]


def test_prepare_volume_resamples_and_stacks() -> None:
    hu = np.zeros((2, 512, 512), dtype=np.float32)
    hu[1] = 60.0
    x = prepare_volume(hu, 128)
    assert x.shape == (2, input_channels(), 128, 128)
    # slice 0's stack is (0, 0, 1): the brain window of its upper neighbour sees 60 HU
    assert float(x[0, 0].mean()) == pytest.approx(0.0)
    assert float(x[0, 6].mean()) == pytest.approx(0.75)
    single = prepare_volume(hu[0], 128)
    assert single.shape == (1, input_channels(), 128, 128)


def test_batchnorm_folding_keeps_the_outputs() -> None:
    from inference.model import fuse_batchnorm

    torch.manual_seed(1)
    model = HemorrhageNet(ModelConfig(base_width=4, input_size=32))
    model.train()
    with torch.no_grad():  # give the batch norms non-trivial running statistics
        for _ in range(3):
            model(torch.rand(4, 9, 32, 32) * 2)
    model.eval()
    x = torch.rand(2, 9, 32, 32)
    with torch.inference_mode():
        ref = model(x)
        fused = fuse_batchnorm(model)(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for key in ("cls", "seg", "features"):
        assert torch.allclose(ref[key], fused[key], atol=1e-4), key


def _framed(head: torch.Tensor, pad: int) -> torch.Tensor:
    """The windowed input ``head`` (N, C, H, W) inside ``pad`` pixels of air (0 in every window)."""
    return torch.nn.functional.pad(head, (pad, pad, pad, pad), value=0.0)


def _trained_bn(config: ModelConfig) -> HemorrhageNet:
    torch.manual_seed(5)
    model = HemorrhageNet(config)
    model.train()
    with torch.no_grad():  # running statistics that make air features non-zero
        for _ in range(3):
            model(_framed(torch.rand(4, 9, 32, 32) + 0.2, 16))
    return model.eval()


def test_head_pooling_does_not_see_how_much_air_surrounds_the_head() -> None:
    # The same head framed in 64 and in 192 pixels: pooling over the whole matrix
    # lets the air move the logits, pooling over the head does not (the cells over
    # the head see the same pixels in both frames: their receptive field stays in
    # the air margin of the smaller frame's padding, which is air in both).
    torch.manual_seed(2)
    head = torch.rand(2, 9, 32, 32) * 0.8 + 0.2
    logits = {}
    for pool in ("global", "head"):
        model = _trained_bn(ModelConfig(base_width=4, input_size=64, cls_pool=pool))
        with torch.inference_mode():
            small = model(_framed(head, 64))
            large = model(_framed(head, 128))
        logits[pool] = (small["cls"], large["cls"])
        if pool == "head":
            # only the cells over the head (and their neighbours) are pooled
            assert small["head"].shape == (2, 1, 20, 20)
            assert int(small["head"].sum()) == int(large["head"].sum()) == 2 * 4 * 4
    moved = {pool: float((a - b).abs().max()) for pool, (a, b) in logits.items()}
    assert moved["head"] < 1e-5, moved
    assert moved["global"] > 100 * max(moved["head"], 1e-7), moved


def test_head_pooling_loads_global_weights_and_rejects_unknown_pools() -> None:
    global_net = HemorrhageNet(ModelConfig(base_width=4, input_size=32))
    head_net = HemorrhageNet(ModelConfig(base_width=4, input_size=32, cls_pool="head"))
    head_net.load_state_dict(global_net.state_dict())  # the pooling has no weights
    assert ModelConfig.from_dict(ModelConfig(cls_pool="head").to_dict()).cls_pool == "head"
    with pytest.raises(ValueError, match="cls_pool"):
        ModelConfig(cls_pool="mean")
