import copy
import os

import pytest
import torch

from harness import run
from specexec.protocol.tree import ROOT, DraftTree
from specexec.verifier.disk_streamer import RING, DiskEmbedding, attach, layer_tensors, plan_layers
from specexec.verifier.offload_store import ALIGN, EMBEDDINGS, OffloadStoreError, layout
from specexec.verifier.placement import report
from specexec.verifier.target_model import TargetModel
from tiny_models import greedy_reference, perturbed, tiny_lm

PROMPT = [5, 17, 3, 44, 9, 12, 60]
TREE = DraftTree.build([10, 11, 20, 21, 22, 30, 31, 40], [-1, -1, 0, 0, 1, 2, 2, 5])
LAYERS = 4


def budget_for(model, resident: int, ring: int = RING) -> int:
    """The --max-memory cpu bytes under which `resident` of the model's layers stay in RAM
    (the embedding table read from disk)."""
    layers = model.model.layers
    inside = {id(t) for layer in layers for t in layer_tensors(layer).values()} | {id(model.model.embed_tokens.weight)}
    fixed = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if id(t) not in inside)
    tensors = layer_tensors(layers[0])
    layer_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return fixed + resident * layer_bytes + min(ring, len(layers) - resident) * layout(tensors)[1]


def streamed_copy(model, folder, resident: int, **kw):
    placed = copy.deepcopy(model)
    streamer = attach(placed, str(folder), budget_for(model, resident), resident=resident, **kw)
    assert len(streamer.plan.resident) == resident
    return placed, streamer


def tree_logits(model) -> torch.Tensor:
    target = TargetModel(model)
    cache = target.new_cache()
    target.forward(cache, PROMPT[:3], DraftTree.empty())  # part of the prompt cached first
    out = target.forward(cache, PROMPT[3:], TREE)
    return torch.stack([out.logits(n).float() for n in [ROOT] + list(range(len(TREE)))])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("resident", [0, 2, LAYERS - 1])
def test_streamed_logits_equal_the_in_ram_model_bit_for_bit(arch, dtype, resident, tmp_path):
    model = tiny_lm(arch, layers=LAYERS, seed=4).to(dtype)
    reference = tree_logits(model)
    placed, streamer = streamed_copy(model, tmp_path, resident)
    try:
        assert torch.equal(tree_logits(placed), reference)
        assert torch.equal(tree_logits(placed), reference)  # a second pass through the same buffers
    finally:
        streamer.close()


def test_greedy_generation_is_the_target_own(tmp_path):
    model = tiny_lm("qwen2", layers=LAYERS, seed=4)
    placed, streamer = streamed_copy(model, tmp_path, 1)
    try:
        ref = greedy_reference(model, PROMPT, 20)
        assert run(placed, perturbed(model, 0.05), PROMPT, 20, budget=8).token_ids == ref
    finally:
        streamer.close()


def test_each_streamed_layer_is_read_once_per_forward_in_order_and_the_next_pass_starts_early(tmp_path):
    model = tiny_lm("llama", layers=6, seed=4)
    placed, streamer = streamed_copy(model, tmp_path, 1)
    try:
        streamed, ring = list(streamer.plan.streamed), streamer.plan.ring
        assert (streamed, ring) == ([0, 1, 2, 3, 4], 2) and len(streamer.buffers) == 2
        assert streamer.wait_idle()
        assert list(streamer.read_log) == streamed[:ring]  # read before the first forward is asked for
        buffers = [b.data_ptr() for b in streamer.buffers]
        target = TargetModel(placed)
        cache = target.new_cache()
        for n in range(1, 4):
            target.forward(cache, PROMPT[n - 1:n], DraftTree.empty())
            assert streamer.wait_idle()  # no next forward yet: the reader has gone ahead by itself
            assert list(streamer.read_log) == n * streamed + streamed[:ring]
        assert [b.data_ptr() for b in streamer.buffers] == buffers  # the same ring buffers throughout
        stats = streamer.snapshot()
        assert stats.passes == 3 and stats.layers_read == 3 * 5 + ring
        assert stats.bytes_read == stats.layers_read * streamer.store.layers[0].size
    finally:
        streamer.close()


def test_a_forward_stopped_midway_does_not_shift_the_ring(tmp_path):
    model = tiny_lm("llama", layers=LAYERS, seed=4)
    reference = tree_logits(model)
    placed, streamer = streamed_copy(model, tmp_path, 0)

    def boom(module, args, output):
        raise KeyboardInterrupt

    try:
        handle = placed.model.layers[1].register_forward_hook(boom)
        with pytest.raises(KeyboardInterrupt):
            tree_logits(placed)
        handle.remove()
        assert torch.equal(tree_logits(placed), reference)
    finally:
        streamer.close()


def test_a_closed_streamer_refuses_to_run(tmp_path):
    placed, streamer = streamed_copy(tiny_lm("llama", layers=LAYERS, seed=4), tmp_path, 0)
    streamer.close()
    with pytest.raises(RuntimeError, match="closed"):
        tree_logits(placed)


def test_the_folder_is_reused_and_checked(tmp_path):
    model = tiny_lm("llama", layers=LAYERS, seed=4)
    _, first = streamed_copy(model, tmp_path, 1)
    first.close()
    stamps = {f: os.stat(tmp_path / f).st_mtime_ns for f in os.listdir(tmp_path)}
    _, second = streamed_copy(model, tmp_path, 1)
    second.close()
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in os.listdir(tmp_path)} == stamps  # nothing rewritten
    store = second.store
    assert store.bytes_checked == 3 * store.layers[0].size + store.layers[EMBEDDINGS].size  # all read once
    (tmp_path / "notes.txt").write_text("not ours")
    _, other = streamed_copy(tiny_lm("llama", layers=LAYERS, seed=5), tmp_path, 2)  # other weights: rewritten
    other.close()
    assert os.stat(tmp_path / "layer_000.bin").st_mtime_ns != stamps["layer_000.bin"]
    assert sorted(os.listdir(tmp_path)) == ["embeddings.bin", "layer_000.bin", "layer_001.bin", "manifest.json",
                                            "notes.txt"]  # the old layer_002.bin went with its manifest


def test_a_corrupt_layer_file_is_refused_by_name(tmp_path):
    model = tiny_lm("llama", layers=LAYERS, seed=4)
    _, streamer = streamed_copy(model, tmp_path, 1)
    streamer.close()
    with open(tmp_path / "layer_001.bin", "r+b") as fh:
        fh.seek(300)
        byte = fh.read(1)
        fh.seek(300)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(OffloadStoreError, match=r"layer_001\.bin fails its checksum"):
        streamed_copy(model, tmp_path, 1)
    _, unchecked = streamed_copy(model, tmp_path, 1, verify=False)  # asked not to check: starts
    unchecked.close()
    assert unchecked.store.bytes_checked == 0


def test_a_truncated_layer_file_is_refused_at_start_and_while_streaming(tmp_path):
    model = tiny_lm("llama", layers=LAYERS, seed=4)
    placed, streamer = streamed_copy(model, tmp_path, 0)
    streamer.wait_idle()  # layers 0 and 1 are in the ring; 3 is read during the next forward
    os.truncate(tmp_path / "layer_003.bin", ALIGN)
    with pytest.raises(OffloadStoreError, match=r"layer_003\.bin has 4096 bytes.*truncated"):
        tree_logits(placed)
    streamer.close()
    with pytest.raises(OffloadStoreError, match=r"layer_003\.bin has 4096 bytes.*truncated"):
        streamed_copy(model, tmp_path, 0)


def test_unaligned_tensor_sizes(tmp_path):
    model = tiny_lm("qwen2", layers=3, hidden=40, vocab=97, seed=2).to(torch.bfloat16)  # 80-byte rows
    entries, size = layout(layer_tensors(model.model.layers[0]))
    assert any(e.nbytes % ALIGN for e in entries)
    assert all(e.offset % ALIGN == 0 for e in entries) and size % ALIGN == 0
    reference = tree_logits(model)
    placed, streamer = streamed_copy(model, tmp_path, 1)
    try:
        assert torch.equal(tree_logits(placed), reference)
    finally:
        streamer.close()


@pytest.mark.parametrize("refused_at", ["open", "read"])
def test_a_filesystem_refusing_o_direct_falls_back_to_buffered_reads(tmp_path, monkeypatch, refused_at):
    import errno
    from specexec.verifier import offload_store
    real_open, real_preadv, direct_fds = os.open, os.preadv, set()

    def fake_open(path, flags, *args):
        if flags & os.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *args)
        (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)  # numbers are reused
        return fd

    def fake_preadv(fd, buffers, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(offload_store.os, "open", fake_open)
    monkeypatch.setattr(offload_store.os, "preadv", fake_preadv)
    model = tiny_lm("llama", layers=LAYERS, seed=4)
    reference = tree_logits(model)
    placed, streamer = streamed_copy(model, tmp_path, 1)
    try:
        assert torch.equal(tree_logits(placed), reference)
        assert not streamer.store.direct_io and "buffered reads + DONTNEED" in report(placed)
    finally:
        direct_fds.clear()
        streamer.close()


@pytest.mark.parametrize("where", ["forced", "/dev/shm"])
def test_buffered_reads_and_tmpfs_compute_the_same(tmp_path, where):
    import tempfile
    if where == "/dev/shm" and not os.path.isdir(where):
        pytest.skip("no /dev/shm")
    folder = tempfile.mkdtemp(dir=where) if where == "/dev/shm" else tmp_path
    model = tiny_lm("llama", layers=LAYERS, seed=4)
    reference = tree_logits(model)
    placed, streamer = streamed_copy(model, folder, 1, direct=where != "forced")
    try:
        assert torch.equal(tree_logits(placed), reference)
    finally:
        streamer.close()
        if where == "/dev/shm":
            import shutil
            shutil.rmtree(folder)


def test_converting_while_attaching_equals_loading_in_that_dtype(tmp_path):
    stored = tiny_lm("qwen2", layers=LAYERS, seed=4).to(torch.bfloat16)  # a bf16 checkpoint...
    reference = tree_logits(copy.deepcopy(stored).float())  # ...loaded as float32
    placed = copy.deepcopy(stored)
    streamer = attach(placed, str(tmp_path), budget=0, resident=1, dtype=torch.float32)
    try:
        assert {p.dtype for p in placed.parameters()} == {torch.float32}
        assert torch.equal(tree_logits(placed), reference)
    finally:
        streamer.close()


@pytest.mark.parametrize("case", ["embeddings resident", "tied to the head"])
def test_embeddings_stay_resident_when_asked_or_tied(tmp_path, case):
    model = tiny_lm("llama", layers=LAYERS, seed=4)
    if case == "tied to the head":
        model.lm_head.weight = model.model.embed_tokens.weight
    reference = tree_logits(model)
    placed, streamer = streamed_copy(model, tmp_path, 1, embeddings_on_disk=case == "tied to the head")
    try:
        assert isinstance(placed.model.embed_tokens, torch.nn.Embedding)
        assert "embeddings, norm and head resident" in report(placed)
        assert torch.equal(tree_logits(placed), reference)
    finally:
        streamer.close()


def test_embedding_rows_are_read_from_disk(tmp_path):
    model = tiny_lm("llama", layers=LAYERS, seed=4)
    placed, streamer = streamed_copy(model, tmp_path, 1)
    try:
        table = placed.model.embed_tokens
        assert isinstance(table, DiskEmbedding) and "embedding rows read from disk" in report(placed)
        ids = torch.tensor([[5, 95, 5, 0]])
        assert torch.equal(table(ids), model.model.embed_tokens(ids))
        assert sum(t.numel() for t in placed.parameters()) < sum(t.numel() for t in model.parameters()) - 96 * 64
    finally:
        streamer.close()
    with open(tmp_path / "embeddings.bin", "r+b") as fh:
        fh.seek(10)
        fh.write(b"\xff")
    with pytest.raises(OffloadStoreError, match=r"embeddings\.bin fails its checksum"):
        streamed_copy(model, tmp_path, 1)


def test_packed_linears_are_refused():
    from specexec.launch.packed_linear import pack_linears
    model = tiny_lm("llama", layers=2)
    if not pack_linears(model):
        pytest.skip("no packed linears on this CPU")
    with pytest.raises(ValueError, match="pack=False"):
        attach(model, "/nonexistent", 10**9)


def test_bf16_streaming_matches_where_packed_and_plain_kernels_differ(tmp_path):
    """A bf16 model wide enough that oneDNN's packed and plain linears round differently on a tree:
    the streamed model must still equal the in-RAM one bit for bit (same kernels in every layer)."""
    from specexec.launch.packed_linear import pack_linears
    model = tiny_lm("qwen2", layers=3, hidden=512, seed=3).to(torch.bfloat16)
    long_tree = DraftTree.build([(7 * i) % 96 for i in range(64)], list(range(-1, 63)))

    def logits(m):
        target = TargetModel(m)
        cache = target.new_cache()
        out = target.forward(cache, PROMPT, long_tree)
        return torch.stack([out.logits(n) for n in range(64)])

    reference = logits(model)
    packed = copy.deepcopy(model)
    if not pack_linears(packed) or torch.equal(logits(packed), reference):
        pytest.skip("packed and plain linears round alike on this CPU: the check below would be blind")
    placed, streamer = streamed_copy(model, tmp_path, 1)
    try:
        assert torch.equal(logits(placed), reference)
    finally:
        streamer.close()


def test_plan_keeps_the_last_layers_and_counts_the_ring():
    plan = plan_layers(10, fixed_bytes=100, layer_bytes=10, file_bytes=12, budget=100 + 3 * 10 + 2 * 12)
    assert plan.resident == (7, 8, 9) and plan.streamed == tuple(range(7)) and plan.ring == 2
    assert plan.ram_bytes <= plan.budget and plan.streamed_bytes == 7 * 12
    assert plan_layers(10, 100, 10, 12, budget=10**6).streamed == ()  # everything fits: nothing streamed
    assert plan_layers(10, 100, 10, 12, budget=100 + 8 * 10 + 2 * 12).streamed == ()  # a ring costs what it saves
    assert plan_layers(10, 100, 10, 12, budget=0, resident=9).streamed == (0,)  # forced: all but one, ring of 1
    tight = plan_layers(10, 100, 10, 12, budget=50)
    assert tight.resident == () and tight.ram_bytes > tight.budget


def test_report(tmp_path):
    model = tiny_lm("llama", layers=LAYERS, seed=4)
    placed = copy.deepcopy(model)
    streamer = attach(placed, str(tmp_path), budget_for(model, 1))  # the plan from the budget alone
    try:
        tree_logits(placed)
        text = report(placed)
        assert "1 of 4 decoder layers resident, 3 read from" in text and "2 layer buffers" in text
        assert "2 passes" in text  # the two forwards of tree_logits
        held = sum(t.numel() * t.element_size() for t in list(placed.parameters()) + list(placed.buffers()))
        held += sum(b.numel() for b in streamer.buffers)
        assert held == streamer.plan.ram_bytes <= streamer.plan.budget  # the plan counts what is held
    finally:
        streamer.close()


def test_verdicts_say_what_the_passes_read_from_disk(tmp_path):
    from specexec.protocol.messages import VerifyRequest
    from specexec.protocol.sampling import SamplingParams
    from specexec.verifier.session import SessionConfig, TargetSession
    model = tiny_lm("llama", layers=LAYERS, seed=4)
    placed, streamer = streamed_copy(model, tmp_path, 1)
    try:
        session = TargetSession(TargetModel(placed), SessionConfig(SamplingParams()))
        verdicts = [session.verify(VerifyRequest("s", 0, PROMPT, TREE, 64))]
        for r in range(1, 5):
            verdicts.append(session.verify(VerifyRequest("s", r, [verdicts[-1].bonus], DraftTree.empty(), 64)))
        # each verdict counts the reads since the previous pass (the next pass's first layers are read
        # ahead, while waiting): over 5 passes, 5 passes' worth of layers, give or take the read-ahead
        total = sum(v.extra["read_bytes"] for v in verdicts)
        per_pass = streamer.plan.streamed_bytes
        assert 4 * per_pass <= total <= 6 * per_pass
        assert all(v.extra["read_s"] >= 0 for v in verdicts) and sum(v.extra["read_s"] for v in verdicts) > 0
    finally:
        streamer.close()
