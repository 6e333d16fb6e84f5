"""Backbones: exact checkpoint names/shapes, output shapes and strides, and checkpoint loading."""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cta_model.nn.backbones import (
    BACKBONES,
    Backbone,
    BackboneWeightsError,
    build_backbone,
    load_backbone_weights,
)

pytestmark = pytest.mark.unit

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "backbones"
EXPECTED_KEY_FILES = {
    "resnet18": "resnet18.state_dict.txt",
    "resnet34": "resnet34.state_dict.txt",
    "resnet50": "resnet50.state_dict.txt",
    "hrnet-w18-small-v2": "hrnet_w18_small_v2.state_dict.txt",
}
# torchvision's totals with the fc head, minus the head (513,000 / 513,000 / 2,049,000).
EXPECTED_PARAMETERS = {
    "resnet18": 11_689_512 - 513_000,
    "resnet34": 21_797_672 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
    "hrnet-w18-small-v2": 3_860_720,
}
EXPECTED_OUT_CHANNELS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "hrnet-w18-small-v2": 270,
}
ALLOWED_OUTPUT_STRIDES = {
    "resnet18": (32, 16, 8),
    "resnet34": (32, 16, 8),
    "resnet50": (32, 16, 8),
    "hrnet-w18-small-v2": (4,),
}
_LINE = re.compile(r"^(?P<name>\S+) \((?P<dims>[\d, ]*)\)$")


def read_expected_state_dict(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Parse `name (d0, d1, ...)` lines, skipping `#` comments and blank lines."""
    entries = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _LINE.match(line)
        assert match, f"{path.name}: unparseable line {line!r}"
        dims = tuple(int(d) for d in match["dims"].replace(" ", "").split(",") if d)
        entries.append((match["name"], dims))
    return entries


def randomize(backbone: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and BatchNorm statistic a distinct random value, so that a load that
    skipped or swapped anything would change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in backbone.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(int(torch.randint(1, 1000, (), generator=generator)))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.ndim == 1:  # BN weight/bias, running_mean
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1 + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return backbone


def snapshot(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in backbone.state_dict().items()}


def assert_same_state(actual: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = actual.state_dict()
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.fixture(autouse=True, scope="module")
def _single_thread_and_cleanup() -> Iterator[None]:
    # These convolutions are too small to gain from threads, and on a shared 2-core machine
    # oversubscribed threads made the file several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    shared_backbone.cache_clear()  # don't hold the models for the rest of the session


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@functools.cache
def shared_backbone(name: str, output_stride: int | None = None) -> Backbone:
    """One instance per configuration for tests that only read it (building takes ~0.1-0.4 s)."""
    torch.manual_seed(0)
    return build_backbone(name, output_stride=output_stride).eval()


def test_registry_has_exactly_the_documented_backbones() -> None:
    assert set(BACKBONES) == {"resnet18", "resnet34", "resnet50", "hrnet-w18-small-v2"}


@pytest.mark.parametrize("name", sorted(EXPECTED_KEY_FILES))
def test_state_dict_names_and_shapes_match_checkpoint_layout(name: str) -> None:
    expected = read_expected_state_dict(DATA_DIR / EXPECTED_KEY_FILES[name])
    state = shared_backbone(name).state_dict()
    actual = [(key, tuple(value.shape)) for key, value in state.items()]
    # Compare as sets first for a readable diff, then in order.
    assert set(actual) - set(expected) == set()
    assert set(expected) - set(actual) == set()
    assert actual == expected


def test_expected_key_counts_match_torchvision_minus_fc_head() -> None:
    # torchvision state_dict entries with fc.weight/fc.bias: 122 / 218 / 320.
    for name, with_head in (("resnet18", 122), ("resnet34", 218), ("resnet50", 320)):
        assert len(read_expected_state_dict(DATA_DIR / EXPECTED_KEY_FILES[name])) == with_head - 2
    assert len(read_expected_state_dict(DATA_DIR / EXPECTED_KEY_FILES["hrnet-w18-small-v2"])) == 864


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_parameter_counts(name: str) -> None:
    backbone = shared_backbone(name)
    assert sum(p.numel() for p in backbone.parameters()) == EXPECTED_PARAMETERS[name]


def test_hrnet_parameters_and_running_stats_match_reference_total() -> None:
    # The reference file's header counts parameters + BN running stats (not num_batches_tracked).
    state = shared_backbone("hrnet-w18-small-v2").state_dict()
    total = sum(t.numel() for k, t in state.items() if not k.endswith("num_batches_tracked"))
    assert total == 3_876_668


@pytest.mark.parametrize(
    ("name", "output_stride"),
    [(name, None) for name in sorted(BACKBONES)]
    + [(name, stride) for name in sorted(BACKBONES) for stride in ALLOWED_OUTPUT_STRIDES[name]],
)
def test_output_shape_and_stride(name: str, output_stride: int | None) -> None:
    backbone = build_backbone(name, output_stride=output_stride).eval()
    assert isinstance(backbone, Backbone)
    assert backbone.supported_output_strides == ALLOWED_OUTPUT_STRIDES[name]
    expected_stride = output_stride or ALLOWED_OUTPUT_STRIDES[name][0]
    assert backbone.stride == expected_stride
    assert backbone.out_channels == EXPECTED_OUT_CHANNELS[name]
    with torch.no_grad():
        for height, width in ((64, 64), (96, 128)):
            features = backbone(torch.randn(1, 3, height, width))
            assert features.shape == (
                1,
                backbone.out_channels,
                height // expected_stride,
                width // expected_stride,
            )
            assert torch.isfinite(features).all()


def test_hrnet_accepts_sizes_not_multiple_of_32() -> None:
    with torch.no_grad():
        features = shared_backbone("hrnet-w18-small-v2")(torch.randn(1, 3, 70, 90))
    assert features.shape == (1, 270, math.ceil(70 / 4), math.ceil(90 / 4))


def _conv_geometry(backbone: nn.Module, name: str) -> tuple[int, int, int]:
    conv = backbone.get_submodule(name)
    assert isinstance(conv, nn.Conv2d)
    return conv.stride[0], conv.dilation[0], conv.padding[0]


def test_resnet50_dilation_follows_torchvision_replace_stride_with_dilation() -> None:
    # output_stride 8 == replace_stride_with_dilation=[False, True, True]: the first block of a
    # dilated stage keeps the previous dilation in its 3x3 conv (stride, dilation, padding).
    backbone = shared_backbone("resnet50", 8)
    assert _conv_geometry(backbone, "layer2.0.conv2") == (2, 1, 1)
    assert _conv_geometry(backbone, "layer3.0.conv2") == (1, 1, 1)
    assert _conv_geometry(backbone, "layer3.1.conv2") == (1, 2, 2)
    assert _conv_geometry(backbone, "layer4.0.conv2") == (1, 2, 2)
    assert _conv_geometry(backbone, "layer4.2.conv2") == (1, 4, 4)
    assert backbone.get_submodule("layer4.0.downsample.0").stride == (1, 1)


def test_resnet18_basic_blocks_are_dilated_too() -> None:
    backbone = shared_backbone("resnet18", 16)
    assert _conv_geometry(backbone, "layer3.0.conv1") == (2, 1, 1)
    # layer4 keeps its resolution: conv1 still sees dilation 1 input, conv2 onwards dilation 2.
    assert _conv_geometry(backbone, "layer4.0.conv1") == (1, 1, 1)
    assert _conv_geometry(backbone, "layer4.0.conv2") == (1, 2, 2)
    assert _conv_geometry(backbone, "layer4.1.conv1") == (1, 2, 2)
    assert _conv_geometry(backbone, "layer4.1.conv2") == (1, 2, 2)


def test_unknown_backbone_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet-101") as error:
        build_backbone("resnet-101")
    for name in BACKBONES:
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("name", "output_stride", "allowed"),
    [("resnet18", 4, "32, 16, 8"), ("resnet50", 64, "32, 16, 8"), ("hrnet-w18-small-v2", 8, "4")],
)
def test_unsupported_output_stride_names_flag_and_allowed_values(
    name: str, output_stride: int, allowed: str
) -> None:
    with pytest.raises(ValueError, match="output_stride") as error:
        build_backbone(name, output_stride=output_stride)
    assert f"allowed values: {allowed}" in str(error.value)
    assert name in str(error.value)


def _round_trip(
    name: str, checkpoint_path: Path, write: Callable[[dict[str, torch.Tensor], Path], None]
) -> None:
    source = randomize(build_backbone(name), seed=1).eval()
    write(source.state_dict(), checkpoint_path)
    torch.manual_seed(2)
    target = build_backbone(name)
    target_before = snapshot(target)
    assert not torch.equal(target_before["conv1.weight"], source.state_dict()["conv1.weight"])

    load_backbone_weights(target, checkpoint_path)

    assert_same_state(target, snapshot(source))
    target.eval()
    with torch.no_grad():
        image = torch.randn(1, 3, 64, 96)
        # torch.equal: assert_close would import torch.distributed on first use (~3 s).
        assert torch.equal(target(image), source(image))


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def test_resnet18_safetensors_round_trip(tmp_path: Path) -> None:
    _round_trip("resnet18", tmp_path / "resnet18.safetensors", _save_safetensors)


def test_resnet18_pth_nested_ddp_checkpoint_with_fc_head_round_trip(tmp_path: Path) -> None:
    def write_training_checkpoint(state: dict[str, torch.Tensor], path: Path) -> None:
        wrapped = {f"module.{k}": v for k, v in state.items()}
        wrapped["module.fc.weight"] = torch.randn(1000, 512)
        wrapped["module.fc.bias"] = torch.randn(1000)
        torch.save({"state_dict": wrapped, "epoch": 7, "best_acc1": 69.8}, path)

    _round_trip("resnet18", tmp_path / "checkpoint.pth", write_training_checkpoint)


def test_hrnet_safetensors_with_classification_head_round_trip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    head = {
        "incre_modules.0.0.conv1.weight": torch.randn(32, 18, 1, 1),
        "downsamp_modules.0.0.weight": torch.randn(256, 128, 3, 3),
        "final_layer.0.weight": torch.randn(2048, 1024, 1, 1),
        "classifier.weight": torch.randn(1000, 2048),
        "classifier.bias": torch.randn(1000),
    }

    def write_with_head(state: dict[str, torch.Tensor], path: Path) -> None:
        _save_safetensors({**state, **head}, path)

    with caplog.at_level(logging.INFO, logger="cta_model.nn.backbones.weights"):
        _round_trip(
            "hrnet-w18-small-v2", tmp_path / "hrnet_w18_small_v2.safetensors", write_with_head
        )
    assert any("dropped 5 classification-head entries" in m for m in caplog.messages)


def test_hrnet_pt_nested_under_model_round_trip(tmp_path: Path) -> None:
    def write_nested(state: dict[str, torch.Tensor], path: Path) -> None:
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)

    _round_trip("hrnet-w18-small-v2", tmp_path / "hrnet.pt", write_nested)


def test_build_backbone_loads_weights(tmp_path: Path) -> None:
    source = randomize(build_backbone("resnet34", output_stride=16), seed=3)
    path = tmp_path / "resnet34.bin"
    torch.save(source.state_dict(), path)
    # Dilation changes no parameter, so the checkpoint fits any output stride.
    loaded = build_backbone("resnet34", output_stride=16, weights=path)
    assert_same_state(loaded, snapshot(source))


def test_checkpoint_without_batch_counters_loads(tmp_path: Path) -> None:
    # Checkpoints saved before PyTorch 0.4.1 have no num_batches_tracked entries.
    source = randomize(build_backbone("resnet18"), seed=4)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    target = build_backbone("resnet18")
    load_backbone_weights(target, path)
    loaded = target.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert int(loaded["bn1.num_batches_tracked"]) == 0


def test_mismatched_checkpoint_is_refused_and_backbone_left_unchanged(tmp_path: Path) -> None:
    state = dict(randomize(build_backbone("resnet18"), seed=5).state_dict())
    del state["layer1.0.conv1.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(3, 3)
    state["layer2.0.bn1.weight"] = torch.ones(65)
    path = tmp_path / "broken-resnet18.safetensors"
    _save_safetensors(state, path)
    target = build_backbone("resnet18")
    before = snapshot(target)

    with pytest.raises(BackboneWeightsError) as error:
        load_backbone_weights(target, path)

    message = str(error.value)
    assert "broken-resnet18.safetensors" in message
    assert "1 missing keys: layer1.0.conv1.weight" in message
    assert "1 unexpected keys: layer5.0.conv1.weight" in message
    assert "layer2.0.bn1.weight: expected (128,) vs got (65,)" in message
    assert_same_state(target, before)


def test_error_lists_at_most_twenty_keys_with_count(tmp_path: Path) -> None:
    # Every resnet18 key exists in resnet34, which has 96 more.
    path = tmp_path / "resnet18.pth"
    torch.save(shared_backbone("resnet18").state_dict(), path)
    with pytest.raises(BackboneWeightsError) as error:
        load_backbone_weights(build_backbone("resnet34"), path)
    message = str(error.value)
    assert "96 missing keys" in message
    assert "(76 more)" in message
    assert "unexpected" not in message


_unpickled_objects: list[str] = []


def _record_unpickling() -> str:
    _unpickled_objects.append("ran")
    return "payload"


class _ArbitraryObject:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self) -> tuple[Callable[[], str], tuple[()]]:
        return (_record_unpickling, ())


def test_pickled_python_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "malicious.pth"
    state = dict(build_backbone("resnet18").state_dict())
    state["conv1.weight"] = _ArbitraryObject()  # type: ignore[assignment]
    torch.save(state, path)
    _unpickled_objects.clear()
    target = build_backbone("resnet18")
    before = snapshot(target)

    with pytest.raises(BackboneWeightsError, match="malicious.pth"):
        load_backbone_weights(target, path)

    assert _unpickled_objects == []
    assert_same_state(target, before)


def test_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "notes": "trained on line 3"}, path)
    with pytest.raises(BackboneWeightsError, match="notes"):
        load_backbone_weights(build_backbone("resnet18"), path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_backbone("resnet18", weights=path)


def test_unknown_file_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\x00")
    with pytest.raises(BackboneWeightsError, match=r"\.safetensors"):
        load_backbone_weights(build_backbone("resnet18"), path)
