import pytest
import torch

from harness import run
from specexec.launch.serving import load_target
from specexec.protocol.tree import ROOT, DraftTree
from tiny_models import greedy_reference, perturbed, tiny_lm
from specexec.verifier.placement import Placement, parse_max_memory, report, streams_weights
from specexec.verifier.target_model import TargetModel

PROMPT = [5, 17, 3, 44, 9, 12, 60]
TREE = DraftTree.build([10, 11, 20, 21, 22, 30, 31, 40], [-1, -1, 0, 0, 1, 2, 2, 5])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("placed") / "target"
    model = tiny_lm("llama", layers=4, seed=4)
    model.save_pretrained(path)
    return str(path), model


def tree_logits(target: TargetModel) -> torch.Tensor:
    cache = target.new_cache()
    target.forward(cache, PROMPT[:3], DraftTree.empty())  # part of the prompt cached first
    out = target.forward(cache, PROMPT[3:], TREE)
    return torch.stack([out.logits(n).float().cpu() for n in [ROOT] + list(range(len(TREE)))])


def placements(tmp_path, model):
    size = sum(p.numel() * 4 for p in model.parameters())
    return {
        "one device": Placement(),
        "accelerate cpu cap -> disk": Placement(max_memory=f"cpu={size // 2}B", offload_folder=str(tmp_path / "off"),
                                                offload="accelerate"),
        "accelerate all on disk": Placement(max_memory="cpu=1KB", offload_folder=str(tmp_path / "off2"),
                                            offload="accelerate"),
        "layer streamer": Placement(offload="stream"),
        "disk streamer (the default for a cpu cap with a folder)": Placement(
            max_memory=f"cpu={size // 2}B", offload_folder=str(tmp_path / "off3")),
    }


def test_every_placement_gives_the_unoffloaded_logits_inside_tree_verification(saved, tmp_path):
    path, model = saved
    reference = tree_logits(TargetModel(model))
    for name, placement in placements(tmp_path, model).items():
        placed = load_target(path, "float32", placement)
        got = tree_logits(TargetModel(placed))
        assert (got - reference).abs().max() < 1e-5, name


def test_every_placement_decodes_identically(saved, tmp_path):
    path, model = saved
    draft = perturbed(model, 0.05)
    ref = greedy_reference(model, PROMPT, 20)
    for name, placement in placements(tmp_path, model).items():
        target = TargetModel(load_target(path, "float32", placement))
        assert run(target, draft, PROMPT, 20, budget=8).token_ids == ref, name


def test_placement_reports(saved, tmp_path):
    path, model = saved
    p = placements(tmp_path, model)
    assert "all 4 decoder layers on cpu" in report(load_target(path, "float32", p["one device"]))
    capped = report(load_target(path, "float32", p["accelerate cpu cap -> disk"]))
    assert capped.startswith("placement (accelerate)") and "on disk" in capped
    streamed = load_target(path, "float32", p["layer streamer"])
    assert "4 decoder layers in CPU memory" in report(streamed) and "2 layer buffers" in report(streamed)
    from_disk = report(load_target(path, "float32", p["disk streamer (the default for a cpu cap with a folder)"]))
    assert from_disk.startswith("placement (disk streamed)")


def test_placements_that_stream_weights_say_so(saved, tmp_path):  # drafters default to a large budget there
    path, model = saved
    streams = {name: streams_weights(load_target(path, "float32", placement))
               for name, placement in placements(tmp_path, model).items()}
    assert streams == {name: name != "one device" for name in streams}
    assert streams_weights(type("M", (), {"hf_device_map": {"a": 0, "b": "cpu"}})())  # cpu under a GPU
    assert not streams_weights(type("M", (), {"hf_device_map": {"a": "cpu", "b": "cpu"}})())


def test_streamer_copies_each_layer_once_per_forward(saved):
    path, _ = saved
    model = load_target(path, "float32", Placement(offload="stream"))
    streamer = model._specexec_streamer
    target = TargetModel(model)
    before = streamer.copies
    target.forward(target.new_cache(), PROMPT, TREE)
    assert streamer.copies - before == 4  # 4 layers through 2 buffers


@pytest.mark.parametrize("text, expected", [
    ("cuda:0=20GiB,cpu=64GiB", {0: "20GiB", "cpu": "64GiB"}),
    ("cpu=1GiB", {"cpu": "1GiB"}),
    ("1=512MB, disk=2TB", {1: "512MB", "disk": "2TB"}),
    ("cpu=1000B", {"cpu": 1000}),
])
def test_parse_max_memory(text, expected):
    assert parse_max_memory(text) == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_memory="cpu"), "is not DEVICE=SIZE"),
    (dict(max_memory="cpu=lots"), "is not a size"),
    (dict(max_memory="gpu=1GiB"), "is not cpu, cuda or cuda:N"),
    (dict(device="tpu"), "expected cpu, cuda, cuda:N or auto"),
    (dict(offload="swap"), "expected none, stream, disk or accelerate"),
    (dict(offload="stream", max_memory="cpu=1GiB"), "places layers itself"),
    (dict(offload="disk", max_memory="cpu=1GiB"), "needs --max-memory cpu=SIZE and --offload-folder"),
    (dict(offload="disk", max_memory="disk=1GiB", offload_folder="d"), "needs a cpu budget"),
])
def test_bad_placements_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Placement(**kwargs)


@pytest.mark.parametrize("kwargs, mode", [
    (dict(), "none"),
    (dict(offload="stream"), "stream"),
    (dict(max_memory="cpu=1GiB", offload_folder="d"), "disk"),  # layers on disk for a CPU target: streamed
    (dict(max_memory="cpu=1GiB", offload_folder="d", offload="accelerate"), "accelerate"),
    (dict(max_memory="cpu=1GiB"), "accelerate"),  # no folder: accelerate decides
    (dict(device="auto"), "accelerate"),
])
def test_placement_mode(kwargs, mode):
    placement = Placement(**kwargs)
    assert placement.mode == mode
    assert (placement.load_kwargs() == {}) == (mode in ("none", "stream", "disk"))


def test_descriptions_tell_disk_streaming_from_accelerate():  # the profile cache keys on them
    disk = Placement(max_memory="cpu=1GiB", offload_folder="d")
    assert disk.describe() != Placement(max_memory="cpu=1GiB", offload_folder="d", offload="accelerate").describe()
    assert "streamed from disk" in disk.describe()


def test_cpu_budget_in_bytes():
    assert Placement(max_memory="cpu=1GiB", offload_folder="d").cpu_budget == 2**30

